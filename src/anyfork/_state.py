"""A future's state, and the runners' side of it: the internal API of ``Future``.

:class:`FutureState` is the base of :class:`~anyfork.Future`: the slots that say how far a
future is (pending, finished, failed, cancelled), completing it exactly once
(``_complete``), and its done callbacks' list. The public face (reading, waiting,
awaiting, ``then``) is ``_future.py``'s.

The code that runs work uses the small internal API at the end of this module, and
nothing else of the future's: it :func:`attach`-es one :class:`Work` object (how a blocking
waiter runs the work itself, how cancelling the future stops it), :func:`claim`-s the right
to run it, and settles the future with a value, an error or a cancellation
(:func:`settle`, :func:`settle_failed`, :func:`settle_cancelled`). How its done callbacks
run (order, errors, no recursion, the background loop's hand-off) is ``_callbacks.py``'s
concern; the debug record a fork keeps (:func:`keep_fork_record`) is ``_debug.py``'s.
"""

# The internal API below is this module's own access to the future's state, on behalf of
# the modules that run work: pyright's class-based privacy check does not fit it here.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._blocking import run_inline
from ._callbacks import callback_hand_off, invoke, run_callbacks
from ._reports import start_reporter, watch_until_exit

__all__ = [
    "CANCELLED",
    "FAILED",
    "FINISHED",
    "PENDING",
    "Callback",
    "FutureState",
    "InLine",
    "Record",
    "Work",
    "abandon_in_child",
    "attach",
    "claim",
    "forget_callback",
    "fork_record",
    "has_callbacks",
    "has_failed",
    "is_finished",
    "is_unretrieved_failure",
    "keep_alive",
    "keep_fork_record",
    "mark_retrieved",
    "on_done",
    "release_claim",
    "restore_traceback",
    "settle",
    "settle_cancelled",
    "settle_failed",
    "steal",
    "stealable",
    "take_unretrieved_error",
    "without_catching_frame",
]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

# A future's states: ``_future.py`` imports them under its own private names, and this
# module's moved code reads them by the same private names.
PENDING = _PENDING = 0
FINISHED = _FINISHED = 1
FAILED = _FAILED = 2
CANCELLED = _CANCELLED = 3

#: A done callback: called with the future (a ``Future``, typed loosely here, below it).
Callback = Callable[[Any], object]


def without_catching_frame(exc: E) -> E:
    """Return ``exc`` with the calling frame's entry dropped from the top of its traceback.

    For the ``except`` block that stores a work's exception in a future:
    ``settle_failed(future, without_catching_frame(exc))``. anyfork's catching
    frame is noise in the user's traceback, and it often holds the future: left there, it
    makes the cycle future -> exception -> traceback -> frame -> future. The entry is
    dropped only if it is the caller's own, so the work's frames always stay.

    Dropping the entry is not enough on its own: the work's frame keeps its caller's frame
    alive through ``f_back``, so the catching frame (and every frame of anyfork's above it
    that finishes before the future is dropped) must also let go of the future before it
    returns, e.g. ``del future`` in a ``finally`` (``concurrent.futures`` writes
    ``self = None``).
    """
    top = exc.__traceback__
    if top is not None and top.tb_frame is sys._getframe(1):  # pyright: ignore[reportPrivateUsage]
        exc.__traceback__ = top.tb_next
    return exc


#: What a fork's future keeps of when (``time.monotonic()``) and, in debug mode, where
#: (``file:line in function``) it was made: one tuple in one slot, made and read by
#: ``_debug.py`` (a tuple, not a class: it is made on every fork).
Record = tuple[float, "str | None"]


class FutureState(Generic[T]):
    """How far a future is, and the one way to complete it: the base of ``Future``.

    ``Future.__init__`` sets every slot (one call per future made, not two).
    """

    __slots__ = (
        "_blocking_event",
        "_callbacks",
        "_exception",
        "_fork_record",
        "_keep_alive",
        "_lock",
        "_result",
        "_retrieved",
        "_running",
        "_state",
        "_traceback",
        "_work",
    )

    _lock: threading.RLock
    _state: int
    _result: Any
    _exception: BaseException | None
    _traceback: TracebackType | None
    _retrieved: bool
    _running: bool
    _callbacks: list[Callback]
    _blocking_event: threading.Event | None
    _work: Work | None
    # The fork's record (see keep_fork_record); None for a future not made by fork.
    _fork_record: Record | None
    # An object that must live as long as this future (a foreign future it follows).
    _keep_alive: object

    def _add_callback(self, callback: Callback) -> None:
        with self._lock:
            if self._state == _PENDING:
                self._callbacks.append(callback)
                return
        interrupt = invoke(callback, self)
        if interrupt is not None:
            try:
                raise interrupt
            finally:
                del interrupt

    def _discard_callback(self, callback: Callback) -> None:
        with self._lock:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

    def _start_running(self) -> bool:
        with self._lock:
            if self._state != _PENDING or self._running:
                return False
            self._running = True
            return True

    def _complete(
        self,
        state: int,
        result: Any,
        exception: BaseException | None,
        *,
        unless_running: bool = False,
    ) -> bool:
        with self._lock:
            if self._state != _PENDING or (unless_running and self._running):
                return False
            self._result = result
            self._exception = exception
            if exception is not None:
                self._traceback = exception.__traceback__
            # The state last: readers that take no lock (done(), wait(), value(), await)
            # read the state first, and must find the outcome stored once it says done.
            # Each slot store is a release store (and each load an atomic load) in the
            # free-threaded build, so the order holds there without the GIL too.
            self._state = state
            callbacks = self._callbacks
            self._callbacks = []
            event = self._blocking_event
        self._work = None
        if state == _FAILED:
            start_reporter()  # here, not in __del__: a thread cannot start in the collector
            watch_until_exit(self, _take_report_at_exit)
        if callbacks and (hand_off := callback_hand_off.runner) is not None:
            try:
                hand_off(self, callbacks)
            finally:
                # Whatever the hand-off raises, blocking waiters must wake.
                callbacks = []
                if event is not None:
                    event.set()
        elif event is not None:
            event.set()
        if callbacks:
            run_callbacks(self, callbacks)
        return True

    def _abandon_in_child(self) -> None:
        self._lock = threading.RLock()  # another thread of the parent may have held it
        if self._state == _PENDING:
            self._state = _CANCELLED
            self._callbacks = []
            self._blocking_event = None
            self._work = None


# --- the internal API for the code that runs a future's work ----------------------------
# Sibling modules (forks, groups, the pool, the exit join, foreign futures) use these, and
# never the future's underscored attributes. ``future`` is a ``Future`` (typed as its
# base here, below ``_future.py``; a ``Work``'s methods take ``Any``, so that subclasses
# can say ``Future``).


class Work:
    """What the code running a future's work attaches to it with :func:`attach`.

    The base class does nothing: subclasses override what their kind of work can do. The
    future drops it once done, so it must not be needed after that.
    """

    __slots__ = ()

    #: Whether :meth:`steal` can run the work in a waiting thread (a sync fork's can).
    stealable = False

    def steal(self) -> None:
        """Run the work now, in the calling (waiting) thread, unless it has started or was
        cancelled; then do nothing."""

    #: What runs the work, as :func:`anyfork.pending` reports it.
    kind = "work"

    def cancel(self, future: Any) -> None:
        """Stop the work of ``future``, which was just cancelled (from any thread)."""

    def ask_to_stop(self, future: Any) -> None:
        """Ask the running work of ``future`` to stop (from any thread, never blocking):
        ``cancel()`` found it running (a sync fork sees the request when it checks)."""

    def state(self, future: Any) -> str:
        """``"queued"`` or ``"running"``, for the pending ``future``."""
        return "running" if future._running else "queued"

    def awaited(self) -> None:
        """A task is about to await the future, giving its loop control: work that waits
        for the loop's next turn to start may start now (one loop iteration sooner)."""


class InLine(Work):
    """A remote fork waiting in line for its connection (to a cluster) to open: cancelling
    it takes it out of the line (``leave``), so it is never sent."""

    __slots__ = ("_leave",)

    kind = "remote"

    def __init__(self, leave: Callable[[Any], object]) -> None:
        self._leave = leave

    def state(self, future: Any) -> str:
        return "queued"

    def cancel(self, future: Any) -> None:
        self._leave(future)


def on_done(future: FutureState[Any], callback: Callback) -> None:
    """``add_done_callback`` for anyfork's own callbacks, which need none of its checks."""
    future._add_callback(callback)


def forget_callback(future: FutureState[Any], callback: Callback) -> None:
    """Remove a callback added with :func:`on_done` that has not run (else nothing)."""
    future._discard_callback(callback)


def attach(future: FutureState[Any], work: Work | None) -> None:
    """Attach the object that runs ``future``'s work (one per future); ``None`` detaches it
    (the work went elsewhere)."""
    future._work = work


def keep_fork_record(future: FutureState[Any], record: Record) -> None:
    """Keep ``record`` (when, and in debug mode where, it was made) with the fork
    ``future``."""
    future._fork_record = record


def fork_record(future: FutureState[Any]) -> tuple[Record, Work | None] | None:
    """The record kept with a pending fork, and the work attached to it; ``None`` for a
    future that is done or was not made by ``fork``."""
    record, work = future._fork_record, future._work
    if record is None or future._state != _PENDING:
        return None
    return record, work


def claim(future: FutureState[Any]) -> bool:
    """Claim the right to run a sync fork's work now; ``False`` if it was cancelled or
    another thread claimed it. From then on ``cancel()`` cannot stop it."""
    return future._start_running()


def release_claim(future: FutureState[Any]) -> None:
    """Undo :func:`claim`: the work goes on elsewhere (a sync fork's returned coroutine, as
    a task), where ``cancel()`` can stop it again."""
    with future._lock:
        future._running = False


def settle(future: FutureState[T], result: T) -> bool:
    """Complete ``future`` with ``result``; ``False`` if it was already done."""
    return future._complete(_FINISHED, result, None)


def settle_failed(future: FutureState[Any], exception: BaseException) -> bool:
    """Complete ``future`` with the error its work raised; ``False`` if already done."""
    return future._complete(_FAILED, None, exception)


def settle_cancelled(
    future: FutureState[Any], cause: BaseException | None = None, *, unless_running: bool = False
) -> bool:
    """Cancel ``future`` without calling its work's :meth:`Work.cancel`.

    :param cause: the cancellation that ended the work, when it did not come from
        ``cancel()``: waiters get it as the ``__cause__`` of their ``CancelledError``
    :param unless_running: leave a future whose work was claimed pending (its thread will
        settle it)
    :return: ``False`` if it was already done (or running, with ``unless_running``)
    """
    return future._complete(_CANCELLED, None, cause, unless_running=unless_running)


def restore_traceback(future: FutureState[Any], exc: BaseException) -> bool:
    """If ``exc`` is the error ``future`` failed with, give it back the traceback ``future``
    stored and return ``True``; else ``False``."""
    if exc is not future._exception:
        return False
    exc.__traceback__ = future._traceback
    return True


def is_finished(future: FutureState[Any]) -> bool:
    """Whether ``future`` completed with a value (not an error, not cancelled)."""
    return future._state == _FINISHED


def has_failed(future: FutureState[Any]) -> bool:
    """Whether ``future`` completed with an error of its work."""
    return future._state == _FAILED


def mark_retrieved(future: FutureState[Any]) -> None:
    """Count ``future``'s error as retrieved: it is not logged when the future is dropped
    (for followers of foreign futures, whose source owns the error)."""
    future._retrieved = True


def is_unretrieved_failure(future: FutureState[Any]) -> bool:
    """Whether ``future`` failed and nobody has retrieved its error yet."""
    return future._state == _FAILED and not future._retrieved


def take_unretrieved_error(future: FutureState[Any]) -> BaseException | None:
    """Return the error of a failed future that nobody retrieved, now counted as retrieved
    (a scope reports it); else ``None``."""
    if future._state != _FAILED or future._retrieved:
        return None
    future._retrieved = True
    return future._exception


def _take_report_at_exit(future: FutureState[Any]) -> tuple[str, BaseException] | None:
    """The report of a failed future still alive and unread at exit, now counted as
    retrieved (see _reports.py: free-threaded 3.13 finalizes it too late to report)."""
    exception = take_unretrieved_error(future)
    return None if exception is None else (repr(future), exception)


def has_callbacks(future: FutureState[Any]) -> bool:
    """Whether something waits for ``future`` through a done callback (a ``collect_all``,
    ``as_completed``, ``then``, an awaiting task)."""
    return bool(future._callbacks)


def keep_alive(future: FutureState[Any], obj: object) -> None:
    """Keep ``obj`` alive as long as ``future`` (a foreign future it follows)."""
    future._keep_alive = obj


def stealable(future: FutureState[Any]) -> bool:
    """Whether ``future`` has work a waiter could run itself (a sync fork not yet done;
    :func:`steal` does nothing if a worker has started it meanwhile)."""
    work = future._work
    return work is not None and work.stealable


def steal(future: FutureState[Any]) -> None:
    """Run ``future``'s work in this thread if it can be and has not started (the helping
    done by ``wait_all`` and the exit join; untimed waits only)."""
    work = future._work
    if work is not None and work.stealable:
        run_inline(work)


def abandon_in_child(future: FutureState[Any]) -> None:
    """In a child made by ``os.fork``: this pending fork belongs to the parent, whose
    threads the child does not have. Read it as cancelled; run none of its callbacks."""
    future._abandon_in_child()
