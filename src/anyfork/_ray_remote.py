"""Remote functions: :func:`remote` marks a sync function to run on the Ray cluster.

A :class:`RemoteFunction` runs here when called; when forked, it pickles itself and its
arguments in the forking thread and hands them to the connection (``_ray_connection``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from typing_extensions import ParamSpec

from . import _remote
from ._future import Future
from ._ray_connection import submit
from ._ray_tasks import RemoteCall, ray, ray_task
from ._torch import grad_mode_flags

__all__ = ["DEFAULT_MAX_RETRIES", "RemoteFunction", "remote"]

P = ParamSpec("P")
T = TypeVar("T")

#: Ray re-runs a task whose worker died up to 3 times by default, silently: a fork runs at
#: most once unless asked (``remote(max_retries=...)``), and a crash fails it.
DEFAULT_MAX_RETRIES = 0


class RemoteFunction(_remote.RemoteFunction[P, T]):
    """A sync function that runs on the Ray cluster when forked, and here when called.

    Made by :func:`remote`, with the Ray :attr:`options` of every fork. It keeps the
    function's signature, so ``anyfork.fork`` stays typed, and pickles by its module and
    name when that finds it again (a module-level ``@remote`` function), so that a Ray task
    can fork it in turn.
    """

    _label = "anyfork.ray.remote"
    _no_loop = "a remote fork runs in a Ray worker's thread with no event loop to await it on"

    def __init__(self, func: Callable[P, T], options: dict[str, Any]) -> None:
        super().__init__(func, options)
        self._task: Any = None  # ray_task with this function's options, on first fork
        self._resources = _requested_resources(options)

    @property
    def options(self) -> dict[str, Any]:
        """The Ray options of every fork (a copy), ``max_retries`` included."""
        return dict(self._options)

    def _pickle(self, obj: object) -> bytes:
        return ray.cloudpickle.dumps(obj)  # type: ignore[no-any-return]

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        payload, call = self._payload_and_call(args, kwargs)
        if self._task is None:
            self._task = ray_task.options(name=self._name, **self._options)
        submit(future, RemoteCall(payload, call, grad_mode_flags(), self._task, self._resources))


def _requested_resources(options: dict[str, Any]) -> dict[str, float]:
    """What one task asks of a node, as Ray counts it (a task takes 1 CPU by default)."""
    request: dict[str, float] = {"CPU": float(options.get("num_cpus", 1))}
    if options.get("num_gpus"):
        request["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        request["memory"] = float(options["memory"])
    custom: dict[str, Any] = options.get("resources") or {}
    for name, amount in custom.items():
        request[str(name)] = float(amount)
    return {name: amount for name, amount in request.items() if amount > 0}


_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "num_cpus": (int, float),
    "num_gpus": (int, float),
    "memory": (int, float),
    "resources": (dict,),
    "max_retries": (int,),
    "retry_exceptions": (bool, list, tuple),
    "runtime_env": (dict,),
    "scheduling_strategy": (str, object),
}


@overload
def remote(func: Callable[P, T], /) -> RemoteFunction[P, T]: ...


@overload
def remote(
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: float | None = None,
    resources: dict[str, float] | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_exceptions: bool | list[type[BaseException]] | None = None,
    runtime_env: dict[str, Any] | None = None,
    scheduling_strategy: Any = None,
) -> Callable[[Callable[P, T]], RemoteFunction[P, T]]: ...


def remote(
    func: Callable[..., Any] | None = None,
    /,
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: float | None = None,
    resources: dict[str, float] | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_exceptions: bool | list[type[BaseException]] | None = None,
    runtime_env: dict[str, Any] | None = None,
    scheduling_strategy: Any = None,
) -> Any:
    """Mark a sync function to run on the Ray cluster when forked.

    Used as a decorator, with or without options. Calling the result runs the function
    here; ``anyfork.fork(func, ...)`` runs it as a Ray task and returns the same
    :class:`~anyfork.Future` as any fork. Its arguments are pickled in the forking thread
    (an argument that cannot be pickled makes ``fork`` raise ``TypeError``), and the
    function is loaded on the workers by its module (defined in ``__main__``, by value).

    :param func: a sync callable
    :param num_cpus: CPUs the task holds while it runs (Ray's default: 1)
    :param num_gpus: GPUs the task holds (Ray sets ``CUDA_VISIBLE_DEVICES`` for it)
    :param memory: bytes of memory the task reserves
    :param resources: custom resources a node must have, e.g. ``{"GPU_A100": 1}``
        (``ray start --resources='{"GPU_A100": 1}'``)
    :param max_retries: how many times Ray runs the task again if its worker dies.
        **0 by default** (Ray's own default is 3): a fork runs at most once unless asked,
        and a crash fails it with Ray's error (``WorkerCrashedError``...)
    :param retry_exceptions: also run it again when it raises (``True``, or a list of
        exception types), up to ``max_retries`` times
    :param runtime_env: Ray's runtime environment for the task (``pip``, ``env_vars``...)
    :param scheduling_strategy: Ray's scheduling strategy (``"SPREAD"``, a placement group's
        or a node's strategy)
    :return: a :class:`RemoteFunction`, or a decorator making one
    :raises TypeError: for a coroutine function, a non-callable, or an option of the wrong
        type

    Example::

        @anyfork.ray.remote(num_gpus=1)
        def embed(texts: list[str]) -> list[list[float]]: ...
    """
    given = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "memory": memory,
        "resources": resources,
        "max_retries": max_retries,
        "retry_exceptions": retry_exceptions,
        "runtime_env": runtime_env,
        "scheduling_strategy": scheduling_strategy,
    }
    options = _remote.checked_options(given, _OPTION_TYPES)

    return _remote.decorate(RemoteFunction, func, options)
