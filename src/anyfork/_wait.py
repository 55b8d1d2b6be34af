"""Waiting on futures: ``wait``, ``wait_async``, ``collect_all``, ``wait_all`` and
``as_completed``.

Besides anyfork's own futures these accept ``concurrent.futures.Future`` (what
``ThreadPoolExecutor.submit`` and ``asyncio.run_coroutine_threadsafe`` return) and, when
torch is imported, torch futures (``torch.futures.Future`` and the ``torch._C.Future`` that
``torch.jit.fork`` returns), each adapted into an anyfork future that follows it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, cast, overload

import anyio

from . import _loops
from ._blocking import may_run_inline
from ._errors import WouldBlockError
from ._foreign import follow_concurrent
from ._future import (
    Future,
    block_until_done,
    check_timeout,
    forget_callback,
    is_finished,
    on_done,
    settle,
    steal,
    stealable,
)
from ._torch import TorchFuture, follow_torch, is_torch_future

__all__ = ["AsCompleted", "as_completed", "collect_all", "wait", "wait_all", "wait_async"]

T = TypeVar("T")
# What as_completed yields: the very objects it was given.
F_co = TypeVar("F_co", covariant=True)
FutureLike = TypeVar(
    "FutureLike", bound="Future[Any] | concurrent.futures.Future[Any] | TorchFuture[Any]"
)


def as_future(obj: object, caller: str) -> Future[Any]:
    """Return ``obj`` as an anyfork future, or raise a TypeError naming ``caller``."""
    # mypy sees Future[Any] after isinstance, pyright Future[Unknown]: the casts serve pyright.
    if isinstance(obj, Future):
        return cast("Future[Any]", obj)  # type: ignore[redundant-cast]
    if isinstance(obj, concurrent.futures.Future):
        return follow_concurrent(cast("concurrent.futures.Future[Any]", obj))  # type: ignore[redundant-cast]
    if is_torch_future(obj):
        return follow_torch(obj)
    hint = ""
    if obj is None:
        hint = ": did the function that should return the future forget to?"
    elif inspect.iscoroutine(obj):
        obj.close()  # it will never run: spare the user a "never awaited" warning too
        hint = ": await a coroutine, or fork its coroutine function to get a future"
    raise TypeError(
        f"{caller}() takes an anyfork.Future, a concurrent.futures.Future or a "
        f"torch.futures.Future, got "
        f"{type(obj).__name__} {obj!r}{hint}"
    )


@overload
def wait(future: Future[T], timeout: float | None = None) -> T: ...
@overload
def wait(future: concurrent.futures.Future[T], timeout: float | None = None) -> T: ...
@overload
def wait(future: TorchFuture[T], timeout: float | None = None) -> T: ...
def wait(future: Any, timeout: float | None = None) -> Any:
    """Block until ``future`` is done and return its value (the blocking form of ``await``).

    A sync fork that has not started yet runs in the waiting thread instead (work stealing).
    Called on an event-loop thread, it returns the value of a done future and raises
    :class:`WouldBlockError` for a pending one rather than freezing the loop.

    :param future: an :class:`anyfork.Future`, a :class:`concurrent.futures.Future` or a
        ``torch.futures.Future`` (no thread waits for it: its done callback wakes ours)
    :param timeout: seconds to wait at most; ``None`` (or ``math.inf``) waits for as long as
        it takes
    :raises TypeError: if ``future`` is neither kind of future
    :raises ValueError: if ``timeout`` is negative or NaN
    :raises TimeoutError: if the timeout elapses first
    :raises CancelledError: if the future was cancelled
    :raises WouldBlockError: if called on an event-loop thread for a pending future
    """
    try:
        return as_future(future, "wait").wait(timeout)
    finally:
        del future  # a frame that re-raises a future's error must not hold it (Future._outcome)


@overload
async def wait_async(future: Future[T]) -> T: ...
@overload
async def wait_async(future: concurrent.futures.Future[T]) -> T: ...
@overload
async def wait_async(future: TorchFuture[T]) -> T: ...
async def wait_async(future: Any) -> Any:
    """Wait for ``future`` without blocking the event loop and return its value.

    The same as ``await future`` for an anyfork future, and accepts a
    :class:`concurrent.futures.Future` or a ``torch.futures.Future`` too (awaiting one holds
    no thread: the torch future's done callback wakes the waiting loop). Cancelling the
    waiting task stops the waiting, never the work: other callers may be waiting for the
    same future.

    :raises TypeError: if ``future`` is neither kind of future
    :raises CancelledError: if the future was cancelled
    """
    try:
        return await as_future(future, "wait_async")
    finally:
        del future  # a frame that re-raises a future's error must not hold it (Future._outcome)


@overload
def collect_all(futures: Iterable[Future[T]]) -> Future[list[Future[T]]]: ...
@overload
def collect_all(futures: Iterable[Any]) -> Future[list[Future[Any]]]: ...
def collect_all(futures: Iterable[Any]) -> Future[list[Future[Any]]]:
    """Return a future that is done when every future in ``futures`` is done.

    Its value is the list of those futures, in input order, each done (read each with
    :meth:`Future.value`); like ``torch.futures.collect_all`` it never fails itself. An empty
    input gives a future already done with ``[]``. ``concurrent.futures.Future`` and torch future
    inputs appear in the list as the anyfork futures that follow them.

    Example::

        everything = await anyfork.collect_all([fork(a), fork(b)])
        values = [f.value() for f in everything]
    """
    members = _as_futures(futures, "collect_all")
    combined: Future[list[Future[Any]]] = Future(name="collect_all")
    remaining = len(members)
    if not remaining:
        settle(combined, [])
        return combined
    lock = threading.RLock()

    def one_done(_: Future[Any]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            settle(combined, members)

    for member in members:
        on_done(member, one_done)
    return combined


@overload
def wait_all(futures: Iterable[Future[T]], timeout: float | None = None) -> list[T]: ...
@overload
def wait_all(futures: Iterable[Any], timeout: float | None = None) -> list[Any]: ...
def wait_all(futures: Iterable[Any], timeout: float | None = None) -> list[Any]:
    """Block until every future is done, then return their values in input order.

    Waiting continues past a failure; once all are done, the first failure in input order
    is raised. Without a timeout, sync forks that no worker has started yet run in the
    waiting thread (work stealing, from the last one back), so the waiting thread helps
    rather than idles; with a timeout nothing runs inline, so the timeout holds.

    :param timeout: seconds to wait for all of them at most; ``None`` (or ``math.inf``)
        waits for as long as it takes
    :raises ValueError: if ``timeout`` is negative or NaN
    :raises TimeoutError: if the timeout elapses first
    """
    members = _as_futures(futures, "wait_all")
    timeout = check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if timeout is None and may_run_inline():
            _run_unstarted_from_the_back(members)
        _block_until_all_done(members, deadline)
        return _values_in_order(members)
    finally:
        # A frame that re-raises a future's error must not hold it (see Future._outcome).
        del futures, members


def _run_unstarted_from_the_back(members: list[Future[Any]]) -> None:
    # Help first: run sync forks that no worker has started yet, from the last one back,
    # while the workers take them from the front. With fewer worker threads than forks the
    # waiting thread works instead of idling on a running one.
    for member in reversed(members):
        steal(member)


def _block_until_all_done(members: list[Future[Any]], deadline: float | None) -> None:
    for member in members:
        if not member.done():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            block_until_done(member, left)


def _values_in_order(members: list[Future[Any]]) -> list[Any]:
    """The values of done futures, or the first failure in input order, raised."""
    first_not_finished = next((m for m in members if not is_finished(m)), None)
    if first_not_finished is None:
        return [member.value() for member in members]
    del members
    try:
        return [first_not_finished.value()]  # raises its exception or CancelledError
    finally:
        del first_not_finished


def _as_futures(futures: Iterable[Any], caller: str) -> list[Future[Any]]:
    _check_iterable(futures, caller)
    return [as_future(item, caller) for item in futures]


def _check_iterable(futures: object, caller: str) -> None:
    if isinstance(futures, (Future, concurrent.futures.Future)) or not isinstance(
        futures, Iterable
    ):
        raise TypeError(f"{caller}() takes a list of futures, got {futures!r}")


@overload
def as_completed(
    futures: Iterable[FutureLike], timeout: float | None = None
) -> AsCompleted[FutureLike]: ...
@overload
def as_completed(futures: Iterable[Any], timeout: float | None = None) -> AsCompleted[Any]: ...
def as_completed(futures: Iterable[Any], timeout: float | None = None) -> AsCompleted[Any]:
    """Iterate over ``futures`` as they finish: with ``for`` in a script or a worker thread,
    with ``async for`` in async code (asyncio, uvloop, trio).

    Each future is yielded exactly once, as soon as it is done (finished, failed or
    cancelled), in the order they complete; read each with :meth:`Future.value`. Futures
    already done when this is called come first, in input order. What is yielded is what
    was passed in: a :class:`concurrent.futures.Future` or torch future comes back as itself.
    A future passed in more than once is yielded once.

    Example::

        for future in anyfork.as_completed([anyfork.fork(fetch, url) for url in urls]):
            print(future.value())  # the first page to arrive, then the next...

        async for future in anyfork.as_completed(futures):  # never blocks the loop
            progress.update(1)

    Breaking out of the loop early stops the iterating, never the work: the futures not yet
    yielded keep running (cancel them to stop them). Once the iterator is gone (a ``break``
    or an exception left the loop, or it was garbage collected), it lets go of the futures
    it has not yielded, so their results are not kept alive by those still pending; keep
    the iterator in a variable to carry on later.

    The ``for`` form waits like :func:`wait`: a worker thread gives its place in the pool
    back while it blocks, and, without a timeout, a sync fork that no worker has started
    yet runs in the iterating thread when nothing else is done (work stealing, from the
    last one back, as in :func:`wait_all`). On an event-loop thread the same rule as for
    every blocking wait holds: done futures are yielded, a sync fork not started yet runs
    in the caller, and anything else raises :class:`WouldBlockError`; use ``async for``
    there.

    :param futures: an iterable of :class:`anyfork.Future`, :class:`concurrent.futures.Future`
        or ``torch.futures.Future``, read at once
    :param timeout: seconds from this call until every future must have been yielded;
        ``None`` (or ``math.inf``) waits for as long as it takes. A future already done is
        still yielded after the deadline; waiting past it raises.
    :raises TypeError: if ``futures`` is not an iterable of futures (naming the item that
        is not one)
    :raises ValueError: if ``timeout`` is negative or NaN
    :raises TimeoutError: from the iteration, when it would have to wait past the deadline;
        the message says how many futures were still pending
    :raises WouldBlockError: from a ``for`` iteration on an event-loop thread that would
        have to block
    """
    return AsCompleted(futures, timeout)


# What _Arrivals.take returns when it has no future to hand out.
_NOTHING_YET: Any = object()
_EXHAUSTED: Any = object()


class _Arrivals:
    """A thread-safe queue of the futures that are done and not yet yielded, in the order
    they completed, and the waiters to wake when one arrives.

    One queue serves both forms: a ``for`` iteration waits on an anyfork future (blocking
    with managed blocking, Ctrl-C polling and the loop-thread rule), an ``async for`` on its
    loop's thread-safe wake-up (``_loops.loop_waiter``). Done callbacks run in whichever
    thread completes a future; the lock is reentrant, like every lock of anyfork, so a
    signal handler that completes a future in the middle of a ``take`` does not deadlock.
    """

    __slots__ = ("_done", "_lock", "_wakers", "_watched", "unyielded")

    def __init__(self, count: int) -> None:
        self._lock = threading.RLock()
        self._done: deque[Any] = deque()
        self._wakers: list[Callable[[object], object]] = []
        # Each input's future and the done callback this queue gave it.
        self._watched: list[tuple[Future[Any], Callable[[Future[Any]], object]]] = []
        self.unyielded = count

    def watch(self, member: Future[Any], original: object) -> None:
        """Queue ``original`` (the object to yield) once ``member`` is done."""
        callback = functools.partial(self.arrived, original)
        self._watched.append((member, callback))
        on_done(member, callback)

    def release(self) -> None:
        """The iterator is gone (a loop broke out of it, raised, or it was dropped): let go
        of what it has not yielded, and take its callbacks back from the pending futures,
        so that nothing of it outlives the loop. The work itself goes on."""
        with self._lock:
            watched, self._watched = self._watched, []
            self._done.clear()
            self.unyielded = 0
        for member, callback in watched:
            forget_callback(member, callback)

    def arrived(self, original: object, _: Future[Any]) -> None:
        """The done callback of each future: queue ``original``, the object to yield."""
        with self._lock:
            self._done.append(original)
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake(None)

    def take(self, wake: Callable[[object], object] | None = None) -> Any:
        """The next done future, else ``_EXHAUSTED`` if all were yielded, else
        ``_NOTHING_YET`` (having registered ``wake``, if given, to be called on the next
        arrival: checking and registering under one lock loses no wake-up)."""
        with self._lock:
            if self._done:
                self.unyielded -= 1
                return self._done.popleft()
            if not self.unyielded:
                return _EXHAUSTED
            if wake is not None:
                self._wakers.append(wake)
            return _NOTHING_YET

    def forget(self, wake: Callable[[object], object]) -> None:
        with self._lock:
            try:
                self._wakers.remove(wake)
            except ValueError:  # it was called and dropped already
                pass

    def pending(self) -> int:
        """How many futures are not done yet."""
        with self._lock:
            return self.unyielded - len(self._done)


class AsCompleted(Generic[F_co]):
    """The iterator :func:`as_completed` returns: iterate it with ``for`` or ``async for``.

    It yields each future it was given once, as it finishes. It is its own iterator, so
    one ``for`` may stop and another carry on where it left off, even one of the other
    form.
    """

    __slots__ = ("__weakref__", "_arrivals", "_deadline", "_timeout", "_total", "_unstarted")

    def __init__(self, futures: Iterable[Any], timeout: float | None) -> None:
        originals = _unique(futures)
        members = [as_future(original, "as_completed") for original in originals]
        self._timeout = check_timeout(timeout)
        self._deadline = None if self._timeout is None else time.monotonic() + self._timeout
        self._total = len(members)
        # Sync forks a blocking iteration may run itself, tried from the last one back.
        # With a timeout nothing runs inline (work run inline cannot stop at a deadline).
        untimed = self._timeout is None
        self._unstarted = [m for m in members if stealable(m)] if untimed else []
        self._arrivals = _Arrivals(len(members))
        for original, member in zip(originals, members, strict=True):
            self._arrivals.watch(member, original)
        # Leaving a loop over this iterator drops it (unless the caller keeps it to carry
        # on later): the pending futures must then not keep the results not yet yielded.
        # Not at interpreter exit (weakref.finalize's default): a thread may still iterate.
        weakref.finalize(self, self._arrivals.release).atexit = False

    def __repr__(self) -> str:
        pending = self._arrivals.pending()
        return f"<anyfork.AsCompleted {pending} of {self._total} futures pending>"

    # --- for -----------------------------------------------------------------------------

    def __iter__(self) -> AsCompleted[F_co]:
        return self

    def __next__(self) -> F_co:
        arrivals = self._arrivals
        while True:
            found = arrivals.take()
            if found is _EXHAUSTED:
                raise StopIteration
            if found is not _NOTHING_YET:
                return cast("F_co", found)
            if self._run_one_unstarted():
                continue
            if _loops.running_native_loop() is not None:
                raise WouldBlockError(
                    f"a plain 'for' over as_completed() on an event-loop thread would block "
                    f"the loop while {arrivals.pending()} of {self._total} futures are "
                    "pending (there, only a sync fork that has not started yet, waited for "
                    "without a timeout, runs in the caller): use "
                    "'async for future in anyfork.as_completed(...)' instead"
                )
            left = self._time_left()
            # An anyfork future to block on: its wait gives a worker thread's place in the
            # pool back and lets Ctrl-C through in the main thread, as every wait does.
            arrival: Future[None] = Future(name="as_completed arrival")

            def wake(_: object, arrival: Future[None] = arrival) -> None:
                settle(arrival, None)

            found = arrivals.take(wake)
            if found is _EXHAUSTED:  # pragma: no cover - nothing yielded in between
                raise StopIteration
            if found is not _NOTHING_YET:
                return cast("F_co", found)
            try:
                block_until_done(arrival, left)
            except TimeoutError:
                pass  # the next round raises the deadline's own error
            finally:
                arrivals.forget(wake)

    def _run_one_unstarted(self) -> bool:
        """Run one sync fork that no worker has started yet in this thread, if the waits of
        this thread may; ``False`` if none is left to try."""
        while self._unstarted and may_run_inline():
            member = self._unstarted.pop()
            if stealable(member):  # it may already run in a worker: then this does nothing
                steal(member)
                return True
        return False

    # --- async for -----------------------------------------------------------------------

    def __aiter__(self) -> AsCompleted[F_co]:
        return self

    async def __anext__(self) -> F_co:
        arrivals = self._arrivals
        while True:
            found = arrivals.take()
            if found is _NOTHING_YET:
                left = self._time_left()
                wake, wait = _loops.loop_waiter()
                found = arrivals.take(wake)
                if found is _NOTHING_YET:
                    try:
                        if left is None:
                            await _loops.Awaiting(wait)
                        else:
                            with anyio.move_on_after(left):
                                await _loops.Awaiting(wait)
                    finally:
                        arrivals.forget(wake)
                    continue
            if found is _EXHAUSTED:
                raise StopAsyncIteration
            return cast("F_co", found)

    # --- the deadline --------------------------------------------------------------------

    def _time_left(self) -> float | None:
        """Seconds left until the deadline (``None``: no deadline); raise once it passed."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"as_completed(): {self._arrivals.pending()} of {self._total} futures were "
                f"still pending after the timeout of {self._timeout} seconds"
            )
        return left


def _unique(futures: Iterable[Any]) -> list[Any]:
    """The items of ``futures`` in order, each object once."""
    _check_iterable(futures, "as_completed")
    seen: set[int] = set()
    unique: list[Any] = []
    for item in futures:
        if id(item) not in seen:
            seen.add(id(item))
            unique.append(item)
    return unique
