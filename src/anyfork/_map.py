"""``map``: a function over iterables, forked lazily with at most ``limit`` forks in flight,
its results yielded with ``for`` or ``async for``.

It only calls :func:`anyfork.fork`, so every kind of callable ``fork`` takes works here, in
the place ``fork`` picks for it (a task, the worker pool, the background loop, a cluster),
and a callable that carries its own options brings them along.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Generic, TypeVar, overload

from . import _loops
from ._blocking import may_run_inline
from ._callables import kind_of_fork, name_of
from ._cancel import request_stop
from ._config import current_config
from ._errors import WouldBlockError
from ._fork import fork
from ._future import Future, block_until_done
from ._state import (
    forget_callback,
    mark_retrieved,
    on_done,
    settle,
    settle_failed,
    steal,
    stealable,
)
from ._validate import check_count

__all__ = ["MapIterator", "map"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")


# One overload per number of iterables (as the builtin map's stubs do), the coroutine
# function's first so that its results come unwrapped; from four on, untyped arguments.
@overload
def map(
    func: Callable[[T1], Coroutine[Any, Any, R]],
    iterable: Iterable[T1],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[[T1], R],
    iterable: Iterable[T1],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[[T1, T2], Coroutine[Any, Any, R]],
    iterable: Iterable[T1],
    iterable2: Iterable[T2],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[[T1, T2], R],
    iterable: Iterable[T1],
    iterable2: Iterable[T2],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[[T1, T2, T3], Coroutine[Any, Any, R]],
    iterable: Iterable[T1],
    iterable2: Iterable[T2],
    iterable3: Iterable[T3],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[[T1, T2, T3], R],
    iterable: Iterable[T1],
    iterable2: Iterable[T2],
    iterable3: Iterable[T3],
    /,
    *,
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[..., Coroutine[Any, Any, R]],
    iterable: Iterable[Any],
    iterable2: Iterable[Any],
    iterable3: Iterable[Any],
    iterable4: Iterable[Any],
    /,
    *iterables: Iterable[Any],
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
@overload
def map(
    func: Callable[..., R],
    iterable: Iterable[Any],
    iterable2: Iterable[Any],
    iterable3: Iterable[Any],
    iterable4: Iterable[Any],
    /,
    *iterables: Iterable[Any],
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[R]: ...
def map(
    func: Callable[..., Any],
    /,
    *iterables: Iterable[Any],
    limit: int | None = None,
    ordered: bool = True,
) -> MapIterator[Any]:
    """Fork ``func`` over the items of ``iterables`` and yield the results: with ``for`` in
    a script or a worker thread, with ``async for`` in async code (asyncio, uvloop, trio).

    The items are read and forked lazily, as the results are taken: at most ``limit``
    forks are *in flight* at once (forked, their result not yet yielded), so a generator of
    a million items never has more than ``limit`` futures, or results, in memory. Like the
    builtin ``map``, several iterables give ``func`` one argument each, and the shortest
    one ends the map. Each item is forked with :func:`anyfork.fork`, so it runs where a
    fork of ``func`` would (a task for a coroutine function, the worker pool for a sync
    callable, the cluster for a remote one), with the context of the code iterating.

    Example::

        for page in anyfork.map(fetch_page, urls, limit=8):  # 8 downloads at a time
            save(page)

        async for score in anyfork.map(score_one, rows, limit=4, ordered=False):
            progress.update(1)

    The first ``limit`` items are forked at the call, the next one each time a result is
    yielded. With ``ordered=True`` results come in input order (a slow item holds the ones
    behind it, which still count as in flight); with ``ordered=False`` in the order the
    forks finish.

    An error ends the map: a fork's error (or an error the input raised) is raised when its
    item is reached, in input order, or, unordered, as soon as it is the next to finish.
    Then, as with ``Executor.map``, the items not forked yet are never forked, the forks in
    flight are cancelled (a running sync fork is asked to stop: it sees it through
    :func:`anyfork.check_cancelled`), and their outcomes, errors included, are dropped
    unread. Leaving the loop early does the same: a ``break``, an exception of the loop's
    body, the iterating task being cancelled, :meth:`MapIterator.close`, or the map object
    garbage collected. The input iterator is left where it stopped, neither read further
    nor closed (the items read for the cancelled forks are used up); the map lets go of it.

    The ``for`` form waits like :func:`anyfork.wait`: a sync fork that no worker has
    started yet runs in the iterating thread, a worker thread gives its place in the pool
    back while it blocks, and Ctrl-C gets through. On an event-loop thread the rule for
    every blocking wait holds: a result already there is yielded, a sync fork not started
    yet runs in the caller, and anything else raises :class:`WouldBlockError`; use
    ``async for`` there.

    :param func: the callable to fork for each item: a coroutine function, a sync callable
        or a remote callable (``anyfork.dask.remote``); positional-only
    :param iterables: one iterable per argument of ``func``
    :param limit: the most forks in flight at once; ``None`` means no bound for a coroutine
        function (every item is forked at once: give a limit for a long or endless input)
        and ``worker_threads`` (see :func:`anyfork.configure`) for any other callable
    :param ordered: yield results in input order (``True``) or as the forks finish
    :raises TypeError: if ``func`` cannot be forked (see :func:`anyfork.fork`), no iterable
        is given or one is not iterable, ``limit`` is not an int or ``ordered`` not a bool
    :raises ValueError: if ``limit`` is below 1
    :raises WouldBlockError: from a ``for`` iteration on an event-loop thread that would
        have to block
    :raises RuntimeError: from the iteration, if a fork raised ``StopIteration`` (which
        would end the loop silently; it is the cause), or if two threads or tasks iterate
        one map at once
    """
    is_async = _check_callable(func)
    if limit is not None:
        limit = check_count(limit, "limit")
    elif not is_async:
        limit = current_config().worker_threads
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True or False, got {type(ordered).__name__} {ordered!r}")
    if not iterables:
        raise TypeError(
            "map() takes the function and at least one iterable of its arguments, as the "
            "builtin map does: anyfork.map(func, items)"
        )
    sources: list[Iterator[Any]] = []
    for position, iterable in enumerate(iterables, start=2):
        try:
            sources.append(iter(iterable))
        except TypeError:
            raise TypeError(
                f"map() takes iterables after the function, but argument {position} is "
                f"{type(iterable).__name__} {iterable!r}, which is not iterable"
            ) from None
    # The shortest iterable ends the map, as with the builtin map.
    return MapIterator(func, zip(*sources, strict=False), limit, ordered)


def _check_callable(func: object) -> bool:
    """Whether ``func`` is a coroutine function; raise what ``fork`` would raise for it."""
    if not callable(func) and not inspect.iscoroutine(func):
        raise TypeError(f"map() takes a callable first, got {type(func).__name__} {func!r}")
    is_async, _, _ = kind_of_fork(func)  # TypeError for a coroutine object, a generator kind
    return is_async


class _Window:
    """The forks of one map in flight: made, their outcome not yet handed out.

    The consumer (one thread or task at a time) reads the input and makes the forks, so
    they run with its context and in its scope; done callbacks (unordered maps) come from
    any thread, and ``close`` from any thread or the garbage collector: the lock is
    reentrant, like every lock of anyfork, since the collector may run in the middle of any
    code holding it.
    """

    __slots__ = (
        "_closed",
        "_lock",
        "_pending",
        "_queue",
        "_source",
        "_wakers",
        "busy",
        "func",
        "limit",
        "ordered",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        source: Iterator[tuple[Any, ...]],
        limit: int | None,
        ordered: bool,
    ) -> None:
        self._lock = threading.RLock()
        self.func = func
        self._source: Iterator[tuple[Any, ...]] | None = source
        self.limit = limit
        self.ordered = ordered
        # Ordered: every fork in flight, in input order. Unordered: the forks that are done
        # and not handed out yet, in the order they finished (the others are in _pending).
        self._queue: deque[Future[Any]] = deque()
        self._pending: dict[Future[Any], None] = {}
        self._wakers: list[Callable[[object], object]] = []
        self._closed = False
        # Whether a thread or task is inside __next__/__anext__ (one at a time).
        self.busy = False

    def in_flight(self) -> int:
        # Under the lock: an unordered map's done callback moves a fork from _pending to
        # _queue in another thread, and two unlocked reads could see it in neither (one
        # fork too many in flight; seen with the GIL off).
        with self._lock:
            return len(self._queue) + len(self._pending)

    # --- forking ---------------------------------------------------------------------------

    def fill(self) -> None:
        """Fork the next items until ``limit`` forks are in flight or the input ends."""
        limit = self.limit
        while True:
            source = self._source
            if source is None or (limit is not None and self.in_flight() >= limit):
                return
            try:
                args = next(source)
            except StopIteration:
                self._source = None
                return
            except Exception as exc:  # the input's own error takes the place of its item
                self._source = None
                future: Future[Any] = Future(name="map() input")
                settle_failed(future, exc)
                del exc
            else:
                try:
                    future = fork(self.func, *args)
                except Exception as exc:  # fork refused (ShutdownError, say): same place
                    future = Future(name=f"map() fork of {name_of(self.func)}")
                    settle_failed(future, exc)
                    del exc
                del args
            self._add(future)
            del future

    def _add(self, future: Future[Any]) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                if self.ordered:
                    self._queue.append(future)
                else:
                    self._pending[future] = None
        if closed:  # closed by another thread while this fork was being made
            _abandon(future)
        elif not self.ordered:
            on_done(future, self._finished)

    def _finished(self, future: Future[Any]) -> None:
        """The done callback of an unordered map's forks (any thread)."""
        with self._lock:
            if self._pending.pop(future, _GONE) is _GONE:  # closed meanwhile
                return
            self._queue.append(future)
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake(None)

    # --- taking ----------------------------------------------------------------------------

    def enter(self, iterator: object) -> None:
        """A thread or task starts taking the next result: it must be the only one."""
        with self._lock:
            if self.busy:
                raise RuntimeError(
                    f"{iterator!r} is being iterated by another thread or task: iterate a "
                    "map from one at a time (a generator refuses the same)"
                )
            self.busy = True

    def head(self) -> Future[Any] | None:
        """An ordered map's oldest fork in flight, done or not (it stays in flight, where
        ``close`` cancels it, until :meth:`hand_out`); ``None`` once the map is over."""
        with self._lock:
            return self._queue[0] if self._queue else None

    def hand_out(self, future: Future[Any]) -> None:
        """An ordered map's head is done and about to be handed out: no longer in flight."""
        with self._lock:
            if self._queue and self._queue[0] is future:
                self._queue.popleft()

    def take(self, wake: Callable[[object], object] | None = None) -> Future[Any] | None:
        """An unordered map's first fork to finish that is not handed out yet, else
        ``_NOTHING_YET`` (having registered ``wake`` to be called on the next one: checking
        and registering under one lock loses no wake-up); ``None`` once the map is over."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if not self._pending:
                return None
            if wake is not None:
                self._wakers.append(wake)
            nothing_yet: Future[Any] = _NOTHING_YET
            return nothing_yet

    def forget(self, wake: Callable[[object], object]) -> None:
        with self._lock:
            try:
                self._wakers.remove(wake)
            except ValueError:  # it was called and dropped already
                pass

    def unstarted(self) -> Future[Any] | None:
        """One of an unordered map's latest sync forks that no worker has started, if any.

        Only the latest few are looked at: workers take the oldest first, and a map of a
        coroutine function (none of them stealable) may have thousands in flight.
        """
        with self._lock:
            latest = itertools.islice(reversed(self._pending), _STEALING_LOOKS_AT)
            return next((f for f in latest if stealable(f)), None)

    # --- the end ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Fork nothing more, cancel the forks in flight and drop their outcomes unread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._source = None  # let go of the input: it is neither read nor closed
            abandoned = [*self._queue, *self._pending]
            self._queue.clear()
            self._pending.clear()
            wakers, self._wakers = self._wakers, []
        for future in abandoned:
            if not self.ordered:
                forget_callback(future, self._finished)
            _abandon(future)
        for wake in wakers:  # an unordered consumer waiting in another thread: it ends
            wake(None)


def _abandon(future: Future[Any]) -> None:
    """Cancel a fork whose outcome nobody will read; a running sync fork is asked to stop."""
    if not future.cancel() and not future.done():
        request_stop(future)
    on_done(future, mark_retrieved)  # an error it ends with is dropped by design


_GONE: Any = object()
_STEALING_LOOKS_AT = 64
# What _Window.take returns to an unordered consumer when no fork has finished yet.
_NOTHING_YET: Any = object()


class MapIterator(Generic[R_co]):
    """The iterator :func:`anyfork.map` returns: iterate it with ``for`` or ``async for``.

    It yields each item's result once; it is its own iterator, so one loop may stop and
    another (of either form) carry on where it left off, as long as the first kept the
    object in a variable (else leaving the loop closes it). One thread or task iterates
    it at a time.
    """

    __slots__ = ("__weakref__", "_window")

    def __init__(
        self,
        func: Callable[..., Any],
        source: Iterator[tuple[Any, ...]],
        limit: int | None,
        ordered: bool,
    ) -> None:
        self._window = window = _Window(func, source, limit, ordered)
        # Dropped (a loop over it broke out, or it is garbage): cancel what is in flight.
        # Not at interpreter exit (weakref.finalize's default): the exit join has them.
        weakref.finalize(self, window.close).atexit = False
        try:
            window.fill()
        except BaseException:
            window.close()
            raise

    def __repr__(self) -> str:
        window = self._window
        state = "closed" if window.closed else f"{window.in_flight()} in flight"
        order = "ordered" if window.ordered else "unordered"
        return f"<anyfork.MapIterator of {name_of(window.func)}: {state}, {order}>"

    def close(self) -> None:
        """End the map now: nothing more is forked, the forks in flight are cancelled (a
        running sync fork is asked to stop) and their outcomes dropped; iterating it again
        yields nothing. Never blocks; harmless once closed. Safe from any thread."""
        self._window.close()

    async def aclose(self) -> None:
        """:meth:`close`, for ``contextlib.aclosing`` and async code: it does not wait for
        the cancelled forks to end."""
        self._window.close()

    # --- for -----------------------------------------------------------------------------

    def __iter__(self) -> MapIterator[R_co]:
        return self

    def __next__(self) -> R_co:
        window = self._window
        window.enter(self)
        future: Future[Any] | None = None
        try:
            window.fill()
            if window.ordered:
                future = window.head()
                if future is None:
                    raise StopIteration
                _block_until_done(future, window)
                window.hand_out(future)
            else:
                future = _take_unordered_blocking(window)
                if future is None:
                    raise StopIteration
            if window.closed:  # closed by another thread while this one waited
                raise StopIteration
            return _outcome(future)  # type: ignore[no-any-return]
        except StopIteration:
            raise
        except BaseException:
            window.close()
            raise
        finally:
            window.busy = False
            del future  # a frame that re-raises a future's error must not hold it

    # --- async for -----------------------------------------------------------------------

    def __aiter__(self) -> MapIterator[R_co]:
        return self

    async def __anext__(self) -> R_co:
        window = self._window
        window.enter(self)
        future: Future[Any] | None = None
        try:
            window.fill()
            if window.ordered:
                future = window.head()
                if future is None:
                    raise StopAsyncIteration
                if not future.done():
                    await _until_done(future)
                window.hand_out(future)
            else:
                future = await _take_unordered(window)
                if future is None:
                    raise StopAsyncIteration
            if window.closed:
                raise StopAsyncIteration
            return _outcome(future)  # type: ignore[no-any-return]
        except StopAsyncIteration:
            raise
        except BaseException:  # a fork's error, or this task cancelled: the map is over
            window.close()
            raise
        finally:
            window.busy = False
            del future


def _block_until_done(future: Future[Any], window: _Window) -> None:
    """Wait for an ordered map's next fork as :func:`anyfork.wait` would."""
    if future.done():
        return
    if stealable(future) and may_run_inline():
        steal(future)  # a sync fork no worker has started: run it here
        if future.done():
            return
    _raise_on_a_loop(window)
    block_until_done(future, None)


def _take_unordered_blocking(window: _Window) -> Future[Any] | None:
    """The next fork of an unordered map to finish, blocking this thread until one does;
    ``None`` once the map is over."""
    while True:
        found = window.take()
        if found is not _NOTHING_YET:
            return found
        unstarted = window.unstarted()
        if unstarted is not None and may_run_inline():
            steal(unstarted)  # rather than idle, run a sync fork no worker has started
            del unstarted
            continue
        _raise_on_a_loop(window)
        # An anyfork future to block on: its wait gives a worker thread's place in the
        # pool back and lets Ctrl-C through in the main thread, as every wait does.
        arrival: Future[None] = Future(name="map() arrival")

        def wake(_: object, arrival: Future[None] = arrival) -> None:
            settle(arrival, None)

        found = window.take(wake)
        if found is not _NOTHING_YET:
            window.forget(wake)
            return found
        try:
            block_until_done(arrival, None)
        finally:
            window.forget(wake)


async def _take_unordered(window: _Window) -> Future[Any] | None:
    """The next fork of an unordered map to finish, waiting without blocking the loop;
    ``None`` once the map is over."""
    while True:
        found = window.take()
        if found is not _NOTHING_YET:
            return found
        wake, wait = _loops.loop_waiter()
        found = window.take(wake)
        if found is not _NOTHING_YET:
            window.forget(wake)
            return found
        try:
            await _loops.Awaiting(wait)
        finally:
            window.forget(wake)


def _raise_on_a_loop(window: _Window) -> None:
    if _loops.running_native_loop() is not None:
        raise WouldBlockError(
            f"a plain 'for' over anyfork.map() on an event-loop thread would block the loop "
            f"while {window.in_flight()} forks of {name_of(window.func)} are in flight "
            "(there, only a sync fork that has not started yet runs in the caller): use "
            "'async for result in anyfork.map(...)' instead"
        )


async def _until_done(future: Future[Any]) -> None:
    """Wait for ``future`` to be done without reading its outcome or blocking the loop."""
    wake, wait = _loops.loop_waiter()
    on_done(future, wake)
    try:
        await _loops.Awaiting(wait)
    finally:
        if not future.done():
            forget_callback(future, wake)


def _outcome(future: Future[Any]) -> Any:
    """The value of a done fork, or its error raised; a ``StopIteration`` (or
    ``StopAsyncIteration``) would end the loop as if the map were over, so it becomes the
    cause of a ``RuntimeError``, as a generator's does (PEP 479)."""
    try:
        return future.value()
    except (StopIteration, StopAsyncIteration) as exc:
        raise RuntimeError(
            f"{future.name} raised {type(exc).__name__}, which would end the loop over "
            "anyfork.map() as if the input had run out; it is the cause of this error"
        ) from exc
    finally:
        del future
