"""Remote functions: :func:`remote` marks a sync function to run on the Dask cluster.

A :class:`RemoteFunction` runs here when called; when forked, it pickles itself and its
arguments in the forking thread and hands them to the connection (``_dask_connection``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, overload

import cloudpickle  # type: ignore[import-untyped]
from typing_extensions import ParamSpec

from ._callables import is_coroutine_function
from ._dask_connection import submit
from ._dask_tasks import RemoteCall
from ._future import Future
from ._remote import RemoteCallable
from ._torch import grad_mode_flags

__all__ = ["RemoteFunction", "remote"]

P = ParamSpec("P")
T = TypeVar("T")


class RemoteFunction(RemoteCallable, Generic[P, T]):
    """A sync function that runs on the Dask cluster when forked, and here when called.

    Made by :func:`remote`; it keeps the function's signature, so ``anyfork.fork`` stays
    typed. It pickles by its module and name when that finds it again (a module-level
    ``@remote`` function), so that a task can fork it in turn.
    """

    def __init__(self, func: Callable[P, T], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, func)
        self._name: str = getattr(func, "__qualname__", repr(func))
        self._func = func
        self._options = options
        self._payload: bytes | None = None  # the function pickled, on first fork

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<anyfork.dask.remote {self._name!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        module = getattr(self, "__module__", None)
        name = getattr(self, "__qualname__", None)
        if module not in (None, "__main__") and _find(module, name) is self:
            return (_find, (module, name))
        return (RemoteFunction, (self._func, self._options))

    @property
    def func(self) -> Callable[P, T]:
        """The plain function: fork it to run it on this machine's worker pool instead."""
        return self._func

    @property
    def options(self) -> dict[str, Any]:
        """The Dask options of every fork: ``resources``, ``retries``, ``workers``,
        ``priority`` (a copy)."""
        return dict(self._options)

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._payload is None:
            # By module and name where that finds it, as pickle does (see __reduce__).
            self._payload = _dumps(self, f"the function {self._name}")
        call = _dumps((args, kwargs), f"the arguments of {self._name}")
        submit(future, RemoteCall(self._payload, call, grad_mode_flags(), self._options))


def _find(module: str | None, name: str | None) -> object:
    target: object = sys.modules.get(module or "")
    if target is None:
        import importlib

        target = importlib.import_module(module or "")
    for part in (name or "").split("."):
        target = getattr(target, part, None)
    return target


def _dumps(obj: object, what: str) -> bytes:
    try:
        return cloudpickle.dumps(obj)  # type: ignore[no-any-return]
    except Exception as exc:
        raise TypeError(
            f"anyfork.dask cannot send {what} to the cluster: {exc}. Everything a remote "
            "fork takes must pickle (no open files, locks, sockets or event loops); make "
            "such objects inside the function instead"
        ) from exc


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
    options = {
        "resources": resources,
        "retries": retries,
        "workers": workers,
        "priority": priority,
    }
    for name, value in options.items():
        allowed = _OPTION_TYPES[name]
        if value is not None and not isinstance(value, allowed):
            raise TypeError(f"remote(): {name}= got {type(value).__name__} {value!r}")
    options = {name: value for name, value in options.items() if value is not None}

    def make(target: Callable[P, T]) -> RemoteFunction[P, T]:
        if not callable(target):
            raise TypeError(f"remote() takes a callable, got {type(target).__name__}")
        if is_coroutine_function(target):
            raise TypeError(
                f"anyfork.dask.remote runs sync callables only, and "
                f"{getattr(target, '__qualname__', target)!r} is a coroutine function: a "
                "Dask task runs in a worker thread with no event loop to await it on. Fork "
                "it with anyfork.fork (it runs as a task here), or mark a sync function "
                "that calls anyio.run(...) on the worker"
            )
        return RemoteFunction(target, options)

    return make if func is None else make(func)
