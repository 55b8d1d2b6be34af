"""Process forks: :func:`process` marks a sync function to run in a worker process.

A :class:`ProcessFunction` runs here when called; when forked, it pickles itself and its
arguments in the forking thread (cloudpickle: functions of ``__main__``, of a notebook cell
and closures go by value) and queues them on the pool of worker processes
(``_process_pool``). ``fork`` reaches it through the one door for places outside this
process, ``_remote.RemoteCallable``, so scopes, the exit join and per-callable options
treat it as any fork.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar, overload

from typing_extensions import ParamSpec

from . import _remote
from ._future import Future
from ._process_link import Job
from ._process_pool import pool
from ._remote import RemoteFunction
from ._torch import grad_mode_flags

__all__ = ["ProcessFunction", "process"]

P = ParamSpec("P")
T = TypeVar("T")


class ProcessFunction(RemoteFunction[P, T]):
    """A sync function that runs in a worker process when forked, and here when called.

    Made by :func:`process`; it keeps the function's signature, so ``anyfork.fork`` stays
    typed. It pickles by its module and name when that finds it again (a module-level
    ``@anyfork.process`` function), else by value.
    """

    _label = "anyfork.process"
    _decorator = "process()"
    _no_loop = "a worker process has no event loop of yours to await it on"
    _anyio_run_where = "in the worker"
    _cannot_send = (
        "{engine} cannot send {what} to a worker process: {exc}. Everything a process fork "
        "takes must pickle (no open files, locks, sockets, generators or event loops); make "
        "such objects inside the function instead"
    )

    def __init__(self, func: Callable[P, T]) -> None:
        super().__init__(func, {})

    def _by_value(self) -> tuple[Any, ...]:
        return (self._func,)

    @property
    def func(self) -> Callable[P, T]:
        """The plain function: fork it to run it in a worker thread of this process."""
        return self._func

    def _pickle(self, obj: object) -> bytes:
        import cloudpickle  # type: ignore[import-untyped]

        return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        import pickle

        payload, call = self._payload_and_call(args, kwargs)
        request = pickle.dumps((payload, call, grad_mode_flags()), protocol=5)
        pool.submit(Job(future, self._name, request))


def _require_cloudpickle() -> None:
    try:
        importlib.import_module("cloudpickle")
    except ImportError:
        raise ImportError(
            "anyfork.process needs cloudpickle, to send functions of __main__, notebook cells "
            'and closures to its worker processes: pip install "anyfork[process]"'
        ) from None


@overload
def process(func: Callable[P, T], /) -> ProcessFunction[P, T]: ...


@overload
def process() -> Callable[[Callable[P, T]], ProcessFunction[P, T]]: ...


def process(func: Callable[..., Any] | None = None, /) -> Any:
    """Mark a sync function to run in a worker process when forked.

    Used as a decorator, ``@anyfork.process`` or ``@anyfork.process()``. Calling the result
    runs the function here; ``anyfork.fork(func, ...)`` runs it in one of anyfork's worker
    processes (at most ``configure(process_workers=...)``, by default one per CPU core) and
    returns the same :class:`~anyfork.Future` as any fork. For pure-Python CPU work, which
    threads cannot run in parallel under the GIL.

    - Its arguments are pickled in the forking thread: one that cannot be makes ``fork``
      raise ``TypeError``. Functions of ``__main__``, notebook cells and closures go by
      value (cloudpickle); module-level functions by module and name.
    - Cancelling a running process fork (``cancel()``, its scope, a deadline) kills its
      worker process; a fresh one takes its place. A queued one never starts.
    - A worker process that dies (a segfault, ``os._exit``, the out-of-memory killer) fails
      only its fork, with :class:`~anyfork.ProcessDiedError`.
    - Errors come back with their own type, with the worker's traceback as their
      ``__cause__``; torch's grad and inference mode go along, as for a thread fork.

    :param func: a sync callable
    :return: a :class:`ProcessFunction`, or a decorator making one
    :raises TypeError: for a coroutine function or a non-callable
    :raises ImportError: if cloudpickle is not installed (``pip install "anyfork[process]"``)

    Example::

        @anyfork.process
        def tokenize(text: str) -> list[str]: ...

        futures = [anyfork.fork(tokenize, text) for text in texts]
        tokens = anyfork.wait_all(futures)

    .. versionadded:: 0.2
    """
    _require_cloudpickle()

    return _remote.decorate(ProcessFunction, func)
