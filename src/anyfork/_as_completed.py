"""``as_completed``: iterate over futures as they finish, with ``for`` or ``async for``.

It takes what :func:`anyfork.wait` takes (anyfork, ``concurrent.futures`` and torch
futures, adapted by ``_wait.as_future``) and yields back the very objects it was given.
"""

from __future__ import annotations

import concurrent.futures
import functools
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
from ._future import Future, block_until_done
from ._state import forget_callback, on_done, settle, steal, stealable
from ._torch import TorchFuture
from ._validate import check_timeout
from ._wait import as_future, check_iterable

__all__ = ["AsCompleted", "as_completed"]

# What as_completed yields: the very objects it was given.
F_co = TypeVar("F_co", covariant=True)
FutureLike = TypeVar(
    "FutureLike", bound="Future[Any] | concurrent.futures.Future[Any] | TorchFuture[Any]"
)


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
    check_iterable(futures, "as_completed")
    seen: set[int] = set()
    unique: list[Any] = []
    for item in futures:
        if id(item) not in seen:
            seen.add(id(item))
            unique.append(item)
    return unique
