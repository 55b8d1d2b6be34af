"""Per-callable options: ``anyfork.options(func, limit=..., timeout=..., retries=...)``.

The options travel with the callable, as a :class:`WithOptions` wrapper: calling it calls
``func`` unchanged, and forking it makes ``fork`` route it to ``_attempts``, which drives
the attempts of ``func`` through the same places a plain fork of ``func`` would use (a
task, the worker pool, a cluster), under the limit, within the deadline. So every place
honours the options the same way, without knowing of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, overload

from typing_extensions import ParamSpec

from ._callables import KnownKind, kind_of_fork, unwrap_partial
from ._limits import Limit
from ._remote import RemoteCallable
from ._validate import check_count, check_seconds

__all__ = ["WithOptions", "options"]

T = TypeVar("T")
P = ParamSpec("P")


class _Unset:
    """The default of an option not given (so that an outer ``options`` keeps it)."""

    def __repr__(self) -> str:
        return "<not set>"


_UNSET: Any = _Unset()


class WithOptions(KnownKind, Generic[P, T]):
    """A callable with options for its forks; see :func:`anyfork.options`.

    Calling it calls the wrapped callable unchanged; ``anyfork.fork(wrapped, ...)`` applies
    the options. Its attributes say what they are.
    """

    #: The callable the options apply to (never itself a ``WithOptions``).
    func: Callable[P, T]
    #: The limit its forks run under, or ``None``.
    limit: Limit | None
    #: Seconds from ``fork()`` to the end of the work, or ``None``.
    timeout: float | None
    #: How many more times a failed attempt runs again.
    retries: int
    #: The errors a failed attempt runs again for.
    retry_on: tuple[type[Exception], ...]
    #: The name its forks go by.
    name: str
    #: Whether ``func`` is a remote callable (its attempts are sent away).
    remote: bool

    def __init__(
        self,
        func: Callable[P, T],
        limit: Limit | None,
        timeout: float | None,
        retries: int,
        retry_on: tuple[type[Exception], ...],
        name: str | None,
    ) -> None:
        is_async, func_name, _ = kind_of_fork(func)  # TypeError for what cannot be forked
        try:
            # Its name, doc and signature (__wrapped__), not its attributes: they would
            # shadow the options' own.
            functools.update_wrapper(self, func, updated=())
        except AttributeError:  # pragma: no cover - a callable that refuses attributes
            pass
        self.func = func
        self.limit = limit
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on
        self.name = func_name if name is None else name
        self.fork_kind = (is_async, self.name, True)
        #: Whether ``func`` is a remote callable (its attempts are sent away).
        self.remote = isinstance(unwrap_partial(func), RemoteCallable)

    @property
    def is_async(self) -> bool:
        """Whether its forks are coroutine forks (``func`` is a coroutine function)."""
        return self.fork_kind[0]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.func(*args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # A decorated method: bind it, keeping the options (and the very same limit, shared
        # by every instance's forks).
        if instance is None:
            return self
        bound: Callable[..., Any] = self.func.__get__(instance, owner)
        return WithOptions(bound, self.limit, self.timeout, self.retries, self.retry_on, self.name)

    def __repr__(self) -> str:
        given = [f"limit={self.limit!r}"] if self.limit is not None else []
        if self.timeout is not None:
            given.append(f"timeout={self.timeout!r}")
        if self.retries:
            given.append(f"retries={self.retries!r}")
        return f"<anyfork.options of {self.func!r}{', ' if given else ''}{', '.join(given)}>"


@overload
def options(
    func: Callable[P, T],
    /,
    *,
    limit: int | Limit | None = ...,
    timeout: float | None = ...,
    retries: int = ...,
    retry_on: type[Exception] | tuple[type[Exception], ...] = ...,
    name: str | None = ...,
) -> WithOptions[P, T]: ...


@overload
def options(
    func: None = None,
    /,
    *,
    limit: int | Limit | None = ...,
    timeout: float | None = ...,
    retries: int = ...,
    retry_on: type[Exception] | tuple[type[Exception], ...] = ...,
    name: str | None = ...,
) -> Callable[[Callable[P, T]], WithOptions[P, T]]: ...


def options(
    func: Callable[..., Any] | None = None,
    /,
    *,
    limit: int | Limit | None = _UNSET,
    timeout: float | None = _UNSET,
    retries: int = _UNSET,
    retry_on: type[Exception] | tuple[type[Exception], ...] = _UNSET,
    name: str | None = _UNSET,
) -> Any:
    """Give ``func``'s forks a limit, a deadline and retries.

    Use it as a decorator (``@anyfork.options(limit=4)``, or bare ``@anyfork.options``)
    or call it (``anyfork.options(fn, timeout=2)``). The result calls ``func`` unchanged
    when called directly and applies the options when forked, ``anyfork.fork(wrapped,
    *args)``, for coroutine functions, sync callables and remote callables
    (``anyfork.dask.remote``) alike. It keeps ``func``'s signature, so ``fork`` stays typed.

    Options combine: ``options(options(f, limit=2), timeout=1)`` is ``options(f, limit=2,
    timeout=1)``. The outer call's options replace the inner's where both give one, and
    keep the inner's where the outer gives none (one wrapper, one set of options).

    :param func: the callable; positional-only, omitted in the decorator form
    :param limit: an int ``n`` (a limit of its own: at most ``n`` forks of this callable run
        at once), or a shared :class:`Limit`. Forks beyond it wait in line, first come
        first served, holding no thread, and show as ``"queued"`` in :func:`pending`
    :param timeout: seconds from the ``fork()`` call to the end of the work, retries
        included. At the deadline the future fails with the builtin :class:`TimeoutError`:
        a coroutine fork is cancelled, a queued fork never starts, and a running sync fork
        is asked to stop (it sees it through ``check_cancelled()``); its late result is
        discarded
    :param retries: how many more times to run the work after an attempt fails with one of
        ``retry_on``, within the deadline. The future gets the last error; the earlier
        attempts' errors are chained to it as ``__context__`` (and listed in a note).
        Cancellation, the fork's deadline and ``BaseException`` s are never retried
    :param retry_on: the exception types an attempt is retried for (subclasses of
        :class:`Exception`)
    :param name: the name its forks go by (in ``repr``, :func:`pending`, messages);
        default: ``func``'s qualified name
    :return: the wrapped callable (the decorator, when ``func`` is omitted)
    :raises TypeError: for a ``func`` that cannot be forked, or an option of the wrong type
    :raises ValueError: for a limit below 1, a negative or NaN timeout, a negative retries

    Example::

        @anyfork.options(limit=4, timeout=30, retries=2, retry_on=ConnectionError)
        async def fetch(url: str) -> bytes: ...

        pages = anyfork.wait_all([anyfork.fork(fetch, url) for url in urls])

    .. versionadded:: 0.2
    """
    # Validate now, at the decoration, naming the parameter.
    given: dict[str, Any] = {}
    if limit is not _UNSET:
        if isinstance(limit, Limit) or limit is None:
            given["limit"] = limit
        else:
            given["limit"] = Limit(check_count(limit, "limit"))
    if timeout is not _UNSET:
        given["timeout"] = _check_timeout(timeout)
    if retries is not _UNSET:
        given["retries"] = check_count(retries, "retries", minimum=0)
    if retry_on is not _UNSET:
        given["retry_on"] = _check_retry_on(retry_on)
    if name is not _UNSET:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be None or a str, got {type(name).__name__} {name!r}")
        given["name"] = name

    def wrap(func: Callable[..., Any]) -> WithOptions[..., Any]:
        if isinstance(func, WithOptions):
            inner = cast("WithOptions[..., Any]", func)
            settings: dict[str, Any] = {
                "limit": inner.limit,
                "timeout": inner.timeout,
                "retries": inner.retries,
                "retry_on": inner.retry_on,
                "name": inner.name,
            }
            settings.update(given)
            return WithOptions(inner.func, **settings)
        settings = {"limit": None, "timeout": None, "retries": 0, "retry_on": (Exception,)}
        settings["name"] = None
        settings.update(given)
        return WithOptions(func, **settings)

    if func is None:
        return wrap
    return wrap(func)


def _check_timeout(timeout: object) -> float | None:
    value = check_seconds(timeout, "timeout", allow_none=True, positive=True)
    if value is not None and value == float("inf"):
        return None  # no bound, as for waits
    return value


def _check_retry_on(retry_on: object) -> tuple[type[Exception], ...]:
    kinds: tuple[object, ...] = (
        cast("tuple[object, ...]", retry_on) if isinstance(retry_on, tuple) else (retry_on,)
    )
    if not kinds:
        raise ValueError("retry_on must name at least one exception type, got ()")
    checked: list[type[Exception]] = []
    for kind in kinds:
        if not isinstance(kind, type) or not issubclass(kind, BaseException):
            raise TypeError(
                "retry_on must be an exception type or a tuple of them, e.g. "
                f"retry_on=(ConnectionError, TimeoutError); got {retry_on!r}"
            )
        if not issubclass(kind, Exception):
            raise ValueError(
                f"retry_on cannot retry {kind.__name__}: it is a BaseException meant to stop "
                "the program or the task (KeyboardInterrupt, SystemExit, a cancellation), "
                "never a failure to try again; retry_on takes subclasses of Exception"
            )
        checked.append(kind)
    return tuple(checked)
