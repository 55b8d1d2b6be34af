"""Callables that run their forks somewhere else: on a cluster (``anyfork.dask``,
``anyfork.ray``) or in a worker process (``anyfork.process``).

``fork`` routes a :class:`RemoteCallable` here instead of to the worker pool. The class is
all the core knows of clusters: an integration subclasses it and sends the work away in
:meth:`RemoteCallable.fork_remotely`; :func:`submit_remote_fork` then counts the fork in its
scope and in the exit join, as a sync fork is. :class:`RemoteFunction` is what the
decorators of those integrations share. Nothing here imports a cluster library or a pickler.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from typing_extensions import ParamSpec

from ._callables import is_coroutine_function
from ._exit import exit_join
from ._future import Future
from ._scope import current_scope_group

__all__ = [
    "RemoteCallable",
    "RemoteFunction",
    "checked_options",
    "decorate",
    "remote_call",
    "send_attempt",
    "submit_remote_fork",
]

P = ParamSpec("P")
T = TypeVar("T")


class RemoteCallable:
    """A callable whose forks run elsewhere; calling it directly runs it here."""

    __slots__ = ()

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Send one call away; it completes ``future`` (from a thread of anyfork's worker
        pool, never a cluster library's own loop) and attaches the :class:`Work` that
        cancels it.

        It raises, before sending anything, what makes the call impossible (arguments that
        cannot be sent): ``fork`` raises it to its caller.
        """
        raise NotImplementedError


class RemoteFunction(RemoteCallable, Generic[P, T]):
    """A sync function whose forks run elsewhere, made by a decorator of an integration
    (``anyfork.dask.remote``, ``anyfork.ray.remote``, ``anyfork.process``).

    It runs here when called and keeps the function's signature, so ``anyfork.fork`` stays
    typed. It pickles by its module and name when that finds it again (a module-level
    decorated function), else by value. A subclass names itself (:attr:`_label`), says why a
    coroutine function cannot go there, pickles with its engine's pickler (:meth:`_pickle`)
    and sends the work away (:meth:`fork_remotely`, with :meth:`_dumps`).
    """

    #: The decorator's public name, in reprs and errors: ``anyfork.dask.remote``.
    _label: ClassVar[str]
    #: The decorator as called, in the error for a non-callable: ``remote()``.
    _decorator: ClassVar[str] = "remote()"
    #: Why a coroutine function cannot run there: no event loop to await it on.
    _no_loop: ClassVar[str]
    #: Where a sync function calling ``anyio.run(...)`` would run instead.
    _anyio_run_where: ClassVar[str] = "on the worker"
    #: The error for what cannot pickle; ``{what}`` and ``{exc}`` are filled in.
    _cannot_send: ClassVar[str] = (
        "{engine} cannot send {what} to the cluster: {exc}. Everything a remote fork takes "
        "must pickle (no open files, locks, sockets or event loops); make such objects "
        "inside the function instead"
    )

    def __init__(self, func: Callable[P, T], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, func)
        self._name: str = getattr(func, "__qualname__", repr(func))
        self._func = func
        self._options = options
        self._payload: bytes | None = None  # the function pickled, on first fork

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._label} {self._name!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        module = getattr(self, "__module__", None)
        name = getattr(self, "__qualname__", None)
        if module not in (None, "__main__") and _find(module, name) is self:
            return (_find, (module, name))
        return (type(self), self._by_value())

    def _by_value(self) -> tuple[Any, ...]:
        """The arguments that make this function again, when it pickles by value."""
        return (self._func, self._options)

    @property
    def func(self) -> Callable[P, T]:
        """The plain function: fork it to run it on this machine's worker pool instead."""
        return self._func

    def _pickle(self, obj: object) -> bytes:
        """Pickle with the engine's pickler (cloudpickle, Ray's)."""
        raise NotImplementedError

    def _dumps(self, obj: object, what: str) -> bytes:
        """``obj`` pickled; ``TypeError`` naming the engine and ``what`` if it cannot be."""
        try:
            return self._pickle(obj)
        except Exception as exc:
            engine = self._label.removesuffix(".remote")
            message = self._cannot_send.format(engine=engine, what=what, exc=exc)
            raise TypeError(message) from exc

    def _payload_and_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, bytes]:
        """The function pickled (once: by module and name where that finds it, as pickle
        does, see ``__reduce__``) and this call's arguments pickled."""
        if self._payload is None:
            self._payload = self._dumps(self, f"the function {self._name}")
        return self._payload, self._dumps((args, kwargs), f"the arguments of {self._name}")


def decorate(
    kind: type[RemoteFunction[Any, Any]], func: Callable[..., Any] | None, *args: Any
) -> Any:
    """What ``@decorator`` (``func``) and ``@decorator(...)`` (None) give: ``func`` made a
    ``kind`` of remote function, or a decorator making one. ``args`` follow ``func`` to
    ``kind``'s ``__init__``."""

    # The wording is the class's own (its private class attributes).
    decorator, label = kind._decorator, kind._label  # pyright: ignore[reportPrivateUsage]
    no_loop, where = kind._no_loop, kind._anyio_run_where  # pyright: ignore[reportPrivateUsage]

    def make(target: Callable[..., Any]) -> Any:
        if not callable(target):
            raise TypeError(f"{decorator} takes a callable, got {type(target).__name__}")
        if is_coroutine_function(target):
            raise TypeError(
                f"{label} runs sync callables only, and "
                f"{getattr(target, '__qualname__', target)!r} is a coroutine function: "
                f"{no_loop}. Fork it with anyfork.fork (it runs as a task here), or "
                f"mark a sync function that calls anyio.run(...) {where}"
            )
        return kind(target, *args)

    return make if func is None else make(func)


def _find(module: str | None, name: str | None) -> object:
    """The object ``module.name`` names, importing the module if it must."""
    target: object = sys.modules.get(module or "")
    if target is None:
        target = importlib.import_module(module or "")
    for part in (name or "").split("."):
        target = getattr(target, part, None)
    return target


def checked_options(
    given: dict[str, Any], types: dict[str, tuple[type, ...]], *, bool_is_int: bool = False
) -> dict[str, Any]:
    """The options of a decorator that were given (not None), each of one of its ``types``.

    A bool is not an int there unless ``bool_is_int``. :raises TypeError: for the first
    option of the wrong type.
    """
    for name, value in given.items():
        allowed = types[name]
        wrong = not bool_is_int and isinstance(value, bool) and bool not in allowed
        if value is not None and (wrong or not isinstance(value, allowed)):
            raise TypeError(f"remote(): {name}= got {type(value).__name__} {value!r}")
    return {name: value for name, value in given.items() if value is not None}


def remote_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[RemoteCallable, tuple[Any, ...], dict[str, Any]] | None:
    """The remote callable behind ``func`` (itself, or under partials) with the arguments
    of the whole call; None for work that runs in this process."""
    if isinstance(func, RemoteCallable):
        return func, args, kwargs
    if not isinstance(func, functools.partial):
        return None
    while isinstance(func, functools.partial):
        args = (*func.args, *args)
        kwargs = {**func.keywords, **kwargs}
        func = func.func
    return (func, args, kwargs) if isinstance(func, RemoteCallable) else None


def submit_remote_fork(
    future: Future[Any], remote: RemoteCallable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Send a fork of a remote callable away, counted by its scope and the exit join.

    Nothing is tracked if sending fails (arguments that cannot be sent): ``fork`` raises.
    """
    send_attempt(future, remote, args, kwargs)
    group = current_scope_group()
    if group is not None:
        group.track_sync_fork(future)


def send_attempt(
    future: Future[Any], remote: RemoteCallable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Send one call away, counted by the exit join only: a fork of a remote callable, or
    one attempt of an options-wrapped one (``_attempts``, whose scope counts the fork)."""
    exit_join.check_open()  # no work goes out that nothing would wait for
    remote.fork_remotely(future, args, kwargs)
    exit_join.track(future)
