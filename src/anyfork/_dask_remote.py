"""Remote functions: :func:`remote` marks a sync function to run on the Dask cluster.

A :class:`RemoteFunction` runs here when called; when forked, it pickles itself and its
arguments in the forking thread and hands them to the connection (``_dask_connection``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import cloudpickle  # type: ignore[import-untyped]
from typing_extensions import ParamSpec

from . import _remote
from ._dask_connection import submit
from ._dask_tasks import RemoteCall
from ._future import Future
from ._torch import grad_mode_flags

__all__ = ["RemoteFunction", "remote"]

P = ParamSpec("P")
T = TypeVar("T")


class RemoteFunction(_remote.RemoteFunction[P, T]):
    """A sync function that runs on the Dask cluster when forked, and here when called.

    Made by :func:`remote`; it keeps the function's signature, so ``anyfork.fork`` stays
    typed. It pickles by its module and name when that finds it again (a module-level
    ``@remote`` function), so that a task can fork it in turn.
    """

    _label = "anyfork.dask.remote"
    _no_loop = "a Dask task runs in a worker thread with no event loop to await it on"

    @property
    def options(self) -> dict[str, Any]:
        """The Dask options of every fork: ``resources``, ``retries``, ``workers``,
        ``priority`` (a copy)."""
        return dict(self._options)

    def _pickle(self, obj: object) -> bytes:
        return cloudpickle.dumps(obj)  # type: ignore[no-any-return]

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        payload, call = self._payload_and_call(args, kwargs)
        submit(future, RemoteCall(payload, call, grad_mode_flags(), self._options))


_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "resources": (dict,),
    "retries": (int,),
    "workers": (str, list, tuple, set),
    "priority": (int,),
}


@overload
def remote(func: Callable[P, T], /) -> RemoteFunction[P, T]: ...


@overload
def remote(
    *,
    resources: dict[str, float] | None = None,
    retries: int | None = None,
    workers: str | Sequence[str] | None = None,
    priority: int | None = None,
) -> Callable[[Callable[P, T]], RemoteFunction[P, T]]: ...


def remote(
    func: Callable[..., Any] | None = None,
    /,
    *,
    resources: dict[str, float] | None = None,
    retries: int | None = None,
    workers: str | Sequence[str] | None = None,
    priority: int | None = None,
) -> Any:
    """Mark a sync function to run on the Dask cluster when forked.

    Used as a decorator, with or without options. Calling the result runs the function
    here; ``anyfork.fork(func, ...)`` runs it as a task on the cluster and returns the same
    :class:`~anyfork.Future` as any fork. Its arguments are pickled in the forking thread
    (an argument that cannot be pickled makes ``fork`` raise ``TypeError``), and the
    function is loaded on the workers by its module (defined in ``__main__``, by value).

    :param func: a sync callable
    :param resources: abstract resources a worker must have for the task, e.g.
        ``{"GPU": 1}`` (``dask worker --resources GPU=1``)
    :param retries: how many times Dask re-runs the task if it fails
    :param workers: the worker addresses (or names) allowed to run it
    :param priority: Dask's priority; higher runs first
    :return: a :class:`RemoteFunction`, or a decorator making one
    :raises TypeError: for a coroutine function (a Dask task runs in a thread with no
        event loop), a non-callable, or an option of the wrong type

    Example::

        @anyfork.dask.remote(resources={"GPU": 1}, retries=2)
        def embed(texts: list[str]) -> list[list[float]]: ...
    """
    given = {"resources": resources, "retries": retries, "workers": workers, "priority": priority}
    options = _remote.checked_options(given, _OPTION_TYPES, bool_is_int=True)

    return _remote.decorate(RemoteFunction, func, options)
