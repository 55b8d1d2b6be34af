"""``Future[T]``: a thread-safe result holder that can be waited on blocking or awaited.

The future knows nothing about where its work runs. The code that runs the work uses the
small internal API at the end of this module, and nothing else of the future's: it
:func:`attach`-es one :class:`Work` object (how a blocking waiter runs the work itself, how
cancelling the future stops it), :func:`claim`-s the right to run it, and settles the
future with a value, an error or a cancellation (:func:`settle`, :func:`settle_failed`,
:func:`settle_cancelled`). How its done callbacks run (order, errors, no recursion, the
background loop's hand-off) is ``_callbacks.py``'s concern.
"""

# The internal API below is this module's own access to Future's state, on behalf of the
# modules that run work: pyright's class-based privacy check does not fit it here.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeVar, cast

from typing_extensions import Never

from . import _blocking, _loops
from ._blocking import held_by_task, inline, max_inline_depth, may_run_inline, run_inline
from ._callbacks import (
    callback_hand_off,
    check_callable,
    help_pending_dispatch,
    invoke,
    run_callbacks,
)
from ._errors import AlreadyCompletedError, CancelledError, NotReadyError, WouldBlockError
from ._reports import report_unretrieved, start_reporter, watch_until_exit
from ._validate import check_timeout

__all__ = [
    "Future",
    "Work",
    "attach",
    "block_until_done",
    "claim",
    "fork_record",
    "forget_callback",
    "note_forked",
    "release_claim",
    "on_done",
    "has_callbacks",
    "has_failed",
    "is_finished",
    "is_unretrieved_failure",
    "keep_alive",
    "mark_retrieved",
    "settle",
    "settle_cancelled",
    "settle_failed",
    "steal",
    "stealable",
    "take_unretrieved_error",
    "abandon_in_child",
    "without_catching_frame",
]

T = TypeVar("T")
S = TypeVar("S")
E = TypeVar("E", bound=BaseException)

logger = logging.getLogger("anyfork")

_PENDING = 0
_FINISHED = 1
_FAILED = 2
_CANCELLED = 3

Callback = Callable[["Future[Any]"], object]

_STATE_NAMES = {
    _PENDING: "pending",
    _FINISHED: "finished",
    _FAILED: "failed",
    _CANCELLED: "cancelled",
}


def without_catching_frame(exc: E) -> E:
    """Return ``exc`` with the calling frame's entry dropped from the top of its traceback.

    For the ``except`` block that stores a work's exception in a future:
    ``future._complete(_FAILED, None, without_catching_frame(exc))``. anyfork's catching
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


class Future(Generic[T]):
    """The eventual result of a fork, or of any work that completes it by hand.

    One future serves every kind of caller, from any thread and any event loop:

    * blocking: :meth:`wait` (or :func:`anyfork.wait`) in scripts and worker threads;
    * awaiting: ``await fut`` (or :func:`anyfork.wait_async`) on asyncio, uvloop or trio,
      even a loop other than the one that ran the work, or after that loop has closed;
    * callbacks: :meth:`then` and :meth:`add_done_callback`.

    It completes exactly once, with a result, an exception or a cancellation. Results keep
    their identity and exceptions are re-raised as the very same object.

    Example::

        fut: anyfork.Future[int] = anyfork.Future()
        doubled = fut.then(lambda f: f.value() * 2)
        fut.set_result(21)
        assert doubled.wait() == 42
    """

    __slots__ = (
        "__weakref__",
        "_blocking_event",
        "_callbacks",
        "_exception",
        "_forked_at",
        "_keep_alive",
        "_lock",
        "_result",
        "_retrieved",
        "_running",
        "_site",
        "_state",
        "_traceback",
        "_work",
        "name",
    )

    def __init__(self, *args: Never, name: str | None = None) -> None:
        """
        :param name: a label shown in ``repr`` and in log messages about this future; a
            keyword (``*args`` only exists to turn ``Future("job")`` into an error that
            says what to write, at no cost to every other call)
        """
        if args:
            raise TypeError(
                f"Future() takes its name as a keyword: write Future(name={args[0]!r}) "
                f"instead of Future({args[0]!r})"
            )
        self.name = name
        self._lock = threading.RLock()
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        # The exception's traceback when the work failed; every read re-raises with it, so
        # reads neither grow it nor keep the readers' frames alive (as asyncio does).
        self._traceback: TracebackType | None = None
        self._retrieved = False
        self._running = False
        self._callbacks: list[Callback] = []
        self._blocking_event: threading.Event | None = None
        self._work: Work | None = None
        # Set for forks (see note_forked): when, and in debug mode where, it was made.
        self._forked_at: float | None = None
        self._site: str | None = None
        # An object that must live as long as this future (a foreign future it follows).
        self._keep_alive: object = None

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        state = _STATE_NAMES[self._state]
        if self._state == _PENDING and self._running:
            state = "running"
        site = f" forked at {self._site}" if self._site else ""
        return f"<anyfork.Future{label} {state}{site}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "anyfork.Future cannot be pickled: it is tied to the threads and event loops of "
            "this process. Wait for it and pickle its value() instead."
        )

    def __del__(self) -> None:
        try:
            unretrieved = self._state == _FAILED and not self._retrieved
        except AttributeError:  # __init__ never ran to the end: nothing to report
            return
        if unretrieved:
            # Queued, never logged here: this may run inside the garbage collector, in the
            # middle of any code (see _reports.py). The repr, not the future: a handler that
            # keeps records would otherwise bring the dying future back to life.
            report_unretrieved(repr(self), cast("BaseException", self._exception))

    # --- inspection -------------------------------------------------------------------

    def done(self) -> bool:
        """Return ``True`` once the future has a result, an exception or was cancelled."""
        return self._state != _PENDING

    def cancelled(self) -> bool:
        """Return ``True`` if the future was cancelled."""
        return self._state == _CANCELLED

    def value(self) -> T:
        """Return the result without blocking.

        :raises NotReadyError: if the future is still pending
        :raises CancelledError: if the future was cancelled
        :raises BaseException: the exception the work raised, as the same object
        """
        if self._state == _PENDING:
            raise NotReadyError(
                f"{self!r} is still pending: value() never blocks. Use wait() to block, "
                "or 'await fut' in async code."
            )
        try:
            return self._outcome()
        finally:
            del self  # see _outcome

    def _outcome(self) -> T:
        # Every frame that re-raises the stored exception ends up in its traceback, which
        # the future holds: such a frame deletes its reference to the future on the way
        # out, or it would make the cycle future -> exception -> traceback -> frame ->
        # future (concurrent.futures does the same with 'self = None').
        try:
            state = self._state
            if state == _FINISHED:
                return self._result  # type: ignore[no-any-return]
            if state == _FAILED:
                self._retrieved = True
                assert self._exception is not None
                raise self._exception.with_traceback(self._traceback)
            raise _cancelled_error(self)
        finally:
            del self

    # --- waiting ----------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> T:
        """Block the calling thread until the future is done, then return its value.

        Without a timeout, if the future belongs to a sync fork that has not started yet,
        the waiting thread runs it itself (work stealing). With a timeout nothing runs
        inline, so the timeout holds. A worker thread that blocks here gives its place in
        the pool back while it waits, so nested fork-and-wait never starves.

        :param timeout: seconds to wait at most; ``None`` (or ``math.inf``) waits for as long
            as it takes
        :raises ValueError: if ``timeout`` is negative or NaN
        :raises WouldBlockError: if called on an event-loop thread while still pending;
            use ``await fut`` there instead
        :raises TimeoutError: if the timeout elapses first
        :raises CancelledError: if the future was cancelled
        :raises BaseException: the exception the work raised, as the same object
        """
        timeout = check_timeout(timeout)
        try:
            if self._state == _PENDING:
                # Work stealing is done here rather than in _block_until_done, to keep the
                # frames of each level of a fork-and-wait recursion few.
                work = self._work
                if work is not None and work.stealable and timeout is None and may_run_inline():
                    inline.depth += 1
                    try:
                        work.steal()
                    finally:
                        inline.depth -= 1
                        del work
                if self._state == _PENDING:
                    self._block_until_done(timeout)
            return self._outcome()
        finally:
            del self  # see _outcome

    def _block_until_done(self, timeout: float | None) -> None:
        if _loops.running_native_loop() is not None:
            raise WouldBlockError(
                f"blocking wait on {self!r} from an event-loop thread would freeze the "
                "loop (there, only a sync fork made since the loop last got control, i.e. "
                "with no await between fork and wait, runs in the caller, when waited for "
                "without a timeout): use 'await fut' (or 'await anyfork.wait_async(fut)') "
                "instead"
            )
        # Only an untimed wait runs the work itself: work run inline cannot be interrupted at
        # a timeout, so a timed wait that stole could outlast its bound by the whole job.
        work = self._work
        if (
            work is not None
            and work.stealable
            and timeout is None
            and inline.depth < max_inline_depth()
        ):
            run_inline(work)
        del work
        help_pending_dispatch()
        with self._lock:
            if self._state != _PENDING:
                return
            event = self._blocking_event
            if event is None:
                event = self._blocking_event = threading.Event()
        # A worker thread gives its slot back while it waits (managed blocking), so the work
        # it waits for finds a thread at any worker_threads.
        _blocking.block_on(event, timeout, self)

    def __await__(self) -> Generator[Any, Any, T]:
        # Waits, without blocking the loop, until the future is done. Wake-ups from other
        # threads reach the loop with its own thread-safe call, and cancelling the waiting
        # task only stops the waiting, never the work.
        if self._state != _PENDING:
            # The outcome is read here, in a plain method: an exception raised by __await__
            # itself reaches the awaiting frame as it is, even a StopIteration, which a
            # generator or coroutine would turn into a RuntimeError (PEP 479).
            try:
                return _ready(self._outcome())
            finally:
                del self  # see _outcome
        return self._await_pending()

    def _await_pending(self) -> Generator[Any, Any, T]:
        try:
            # Start work that waits for the loop's next turn first: a worker thread then
            # wakes while this thread gets ready to wait (if the work is done by the time
            # the wake-up is registered, it fires at once).
            work = self._work
            if work is not None:
                work.awaited()
                del work
            wake, wait = _loops.loop_waiter()
            self._add_callback(wake)
            # A task holding a place in a limit gives it back while it waits (see _limits).
            place = held_by_task.get()
            if place is not None and not place.leave():
                place = None
            closing = False
            try:
                yield from wait()
            except GeneratorExit:
                closing = True  # the coroutine is being closed: no more awaiting
                raise
            finally:
                if self._state == _PENDING:
                    self._discard_callback(wake)
                if place is not None and not closing:
                    yield from place.rejoin()
            if self._state == _FAILED and isinstance(self._exception, StopIteration):
                # A generator cannot raise it, and there is no other way to raise it at an
                # await once the task is suspended (Python 3.12+ takes a StopIteration
                # thrown into an await for its return value): say so, with it as cause.
                self._retrieved = True
                raise RuntimeError(
                    f"{self!r} failed with StopIteration, which 'await' can only raise for a "
                    "future that is done when awaited (PEP 479); it is the cause of this "
                    "error. Read it with fut.value() once the future is done"
                ) from self._exception.with_traceback(self._traceback)
            return self._outcome()
        finally:
            del self  # see _outcome

    # --- callbacks --------------------------------------------------------------------

    def add_done_callback(self, callback: Callable[[Future[T]], object]) -> None:
        """Call ``callback(self)`` once the future is done.

        Callbacks run once each, first in first out, in the thread that completes the
        future, or at once in the calling thread if the future is already done. Waiters
        may wake before the callbacks have run, as with :mod:`concurrent.futures`. For forked
        work that thread is usually the event loop's: keep callbacks short, and fork
        anything heavy. The exception is a coroutine fork made in a script, which runs on
        anyfork's background loop: its callbacks run in a worker thread instead, never on
        that hidden loop, so they may block, wait and fork like any script code. An
        exception raised by a callback is logged (logger ``anyfork``) and does not stop
        the callbacks after it. A ``KeyboardInterrupt`` or ``SystemExit`` is not
        swallowed: it is raised in the completing thread (by ``set_result``, say) once
        every other callback has run. A callback that returns a coroutine has it
        closed, and the mistake logged.

        :raises TypeError: if ``callback`` is not callable, or is a coroutine function (a
            callback is called, never awaited)
        """
        check_callable(callback, "add_done_callback")
        self._add_callback(callback)

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

    def to_torch(self) -> Any:
        """Return a ``torch.futures.Future`` that completes with this future.

        For code that expects torch's type: ``torch.futures.collect_all``, a TorchScript
        function taking a ``Future``, ``torch.distributed.rpc``. A value is passed on as is,
        an exception as itself, and cancellation as :class:`CancelledError`. Handing the
        outcome on counts as retrieving it: an error is not reported again when this future
        is dropped. Requires torch (imported here, on first use).

        Example::

            torch_future = anyfork.fork(model, batch).to_torch()
            torch.futures.wait_all([torch_future, other_torch_future])
        """
        # Imported here only: the core never imports torch on its own (and type checks
        # without it).
        torch: Any = importlib.import_module("torch")
        target = torch.futures.Future()

        def hand_on(done: Future[T]) -> None:
            if done._state == _CANCELLED:
                target.set_exception(_cancelled_error(done))
            elif done._exception is not None:
                done._retrieved = True
                target.set_exception(done._exception)
            else:
                target.set_result(done._result)

        self.add_done_callback(hand_on)
        return target

    def _discard_callback(self, callback: Callback) -> None:
        with self._lock:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

    def then(self, callback: Callable[[Future[T]], S]) -> Future[S]:
        """Return a new future holding ``callback(self)`` once this future is done.

        The callback receives this future and reads it with :meth:`value` or :meth:`wait`.
        This future's exception is not propagated automatically: the new future fails only
        if the callback raises, and then with the callback's own exception (torch wraps it
        in ``RuntimeError``; anyfork keeps its type). A callback that returns a coroutine
        (which nothing would await) has it closed, and the new future fails with a
        ``TypeError``. Cancelling the new future before the callback starts means the
        callback never runs; once it runs, ``cancel()`` returns ``False`` and the callback's
        outcome is the new future's.

        Example::

            total = fut.then(lambda f: sum(f.value()))

        :raises TypeError: if ``callback`` is not callable, or is a coroutine function (a
            callback is called, never awaited)
        """
        check_callable(callback, "then")
        child: Future[S] = Future()
        then_callback = _ThenCallback(callback, child)
        # Cancelling the child drops the callback (its Work.cancel), unless it runs already.
        child._work = then_callback
        self._add_callback(then_callback)
        return child

    # --- completion -------------------------------------------------------------------

    def set_result(self, result: T) -> None:
        """Complete the future with ``result``.

        :raises AlreadyCompletedError: if the future is already done; it stays unchanged
        """
        if not self._complete(_FINISHED, result, None):
            raise AlreadyCompletedError(
                f"cannot set the result of {self!r}: a future completes only once"
            )

    def set_exception(self, exception: BaseException) -> None:
        """Complete the future with ``exception``; waiters re-raise that same object.

        :raises TypeError: if ``exception`` is not an exception instance
        :raises AlreadyCompletedError: if the future is already done; it stays unchanged
        """
        if not isinstance(exception, BaseException):
            raise TypeError(
                "set_exception() takes an exception instance, e.g. ValueError('bad input'); "
                f"got {exception!r}"
            )
        if not self._complete(_FAILED, None, exception):
            raise AlreadyCompletedError(
                f"cannot set an exception on {self!r}: a future completes only once"
            )

    def cancel(self) -> bool:
        """Cancel the future and the work behind it.

        A coroutine fork's task is cancelled; a sync fork that has not started never starts.
        A sync fork already running in a thread cannot be stopped, so then nothing happens
        and ``False`` is returned, as with :mod:`concurrent.futures`.

        :return: ``True`` if the future is now cancelled, ``False`` if it was already done
            or its work is running and cannot be stopped
        """
        work = self._work
        if not self._complete(_CANCELLED, None, None, unless_running=True):
            return False
        if work is not None:
            work.cancel(self)
        return True

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


# --- the cause of a cancellation --------------------------------------------------------
# A cancelled future's ``_exception`` may hold the cancellation that ended its work when
# that did not come from cancel() (a coroutine fork that awaited something somebody else
# cancelled). Waiters then get it as the ``__cause__`` of their anyfork.CancelledError.


def _ready(value: T) -> Generator[Any, Any, T]:
    """The ``__await__`` iterator of a future already done: it returns ``value`` at once."""
    return value
    yield  # pragma: no cover - makes this a generator


def _cancelled_error(future: Future[Any]) -> CancelledError:
    error = CancelledError(f"{future!r} was cancelled")
    error.__cause__ = future._exception
    return error


# --- the internal API for the code that runs a future's work ----------------------------
# Sibling modules (forks, groups, the pool, the exit join, foreign futures) use these, and
# never the future's underscored attributes.


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

    def cancel(self, future: Future[Any]) -> None:
        """Stop the work of ``future``, which was just cancelled (from any thread)."""

    def state(self, future: Future[Any]) -> str:
        """``"queued"`` or ``"running"``, for the pending ``future``."""
        return "running" if future._running else "queued"

    def awaited(self) -> None:
        """A task is about to await the future, giving its loop control: work that waits
        for the loop's next turn to start may start now (one loop iteration sooner)."""


class _ThenCallback(Work, Generic[T, S]):
    """The done callback of :meth:`Future.then`: completes ``child`` with ``callback(parent)``.

    It is also the child's :class:`Work`: cancelling the child before the callback starts
    drops the callback, which then never runs; once it runs, ``cancel()`` returns ``False``
    (the callback, like a sync fork in a thread, cannot be stopped). It runs once and lets
    go of both at the start: the frames that dispatched it may outlive the call in a
    traceback (see :func:`without_catching_frame`), and must not hold the child.
    """

    __slots__ = ("_callback", "_child")

    def __init__(self, callback: Callable[[Future[T]], S], child: Future[S]) -> None:
        self._callback: Callable[[Future[T]], S] | None = callback
        self._child: Future[S] | None = child

    kind = "then() callback"

    def cancel(self, future: Future[Any]) -> None:
        # The child was cancelled before its callback started: it never will.
        self._callback = self._child = None

    def __call__(self, parent: Future[T]) -> None:
        callback, child = self._callback, self._child
        if callback is None or child is None:  # cancelled, or already run
            return
        self._callback = self._child = None
        try:
            if not child._start_running():  # cancelled (or completed by hand) meanwhile
                return
            try:
                result = callback(parent)
            except BaseException as exc:
                if exc is parent._exception:
                    # The callback re-raised its parent's error (lambda f: f.value()): keep
                    # the parent's traceback, so a long failing chain does not grow it.
                    exc.__traceback__ = parent._traceback
                else:
                    without_catching_frame(exc)
                if not child._complete(_FAILED, None, exc):
                    _log_lost_error(child, callback, exc)
            else:
                if isinstance(result, types.CoroutineType):
                    # It will never run: spare the user a "never awaited" warning.
                    cast("types.CoroutineType[Any, Any, Any]", result).close()
                    child._complete(
                        _FAILED,
                        None,
                        TypeError(
                            f"the then() callback {callback!r} returned a coroutine, which "
                            "nothing awaits (it was closed): then() calls its callback "
                            "synchronously; pass a sync function, or await the future in a "
                            "task and call the coroutine function there"
                        ),
                    )
                else:
                    child._complete(_FINISHED, result, None)
        finally:
            del child, callback


def _log_lost_error(child: Future[Any], callback: object, exc: BaseException) -> None:
    """A then() callback raised after its child was completed by other means: the error
    cannot be stored, so it is logged rather than lost."""
    logger.error(
        "the then() callback %r raised, but its future %r was already done "
        "(completed by hand while the callback ran)",
        callback,
        child,
        exc_info=exc,
    )


def on_done(future: Future[Any], callback: Callback) -> None:
    """``add_done_callback`` for anyfork's own callbacks, which need none of its checks."""
    future._add_callback(callback)


def forget_callback(future: Future[Any], callback: Callback) -> None:
    """Remove a callback added with :func:`on_done` that has not run (else nothing)."""
    future._discard_callback(callback)


def attach(future: Future[Any], work: Work | None) -> None:
    """Attach the object that runs ``future``'s work (one per future); ``None`` detaches it
    (the work went elsewhere)."""
    future._work = work


def note_forked(future: Future[Any], site: str | None) -> None:
    """Record that ``future`` is a fork's, made now at ``site`` (debug mode, else None)."""
    future._forked_at = time.monotonic()
    future._site = site


def fork_record(future: Future[Any]) -> tuple[float, str | None, Work | None] | None:
    """When and where a pending fork was made and the work attached to it; ``None`` for a
    future that is done or was not made by ``fork``."""
    forked_at, work = future._forked_at, future._work
    if forked_at is None or future._state != _PENDING:
        return None
    return forked_at, future._site, work


def claim(future: Future[Any]) -> bool:
    """Claim the right to run a sync fork's work now; ``False`` if it was cancelled or
    another thread claimed it. From then on ``cancel()`` cannot stop it."""
    return future._start_running()


def release_claim(future: Future[Any]) -> None:
    """Undo :func:`claim`: the work goes on elsewhere (a sync fork's returned coroutine, as
    a task), where ``cancel()`` can stop it again."""
    with future._lock:
        future._running = False


def settle(future: Future[T], result: T) -> bool:
    """Complete ``future`` with ``result``; ``False`` if it was already done."""
    return future._complete(_FINISHED, result, None)


def settle_failed(future: Future[Any], exception: BaseException) -> bool:
    """Complete ``future`` with the error its work raised; ``False`` if already done."""
    return future._complete(_FAILED, None, exception)


def settle_cancelled(
    future: Future[Any], cause: BaseException | None = None, *, unless_running: bool = False
) -> bool:
    """Cancel ``future`` without calling its work's :meth:`Work.cancel`.

    :param cause: the cancellation that ended the work, when it did not come from
        ``cancel()``: waiters get it as the ``__cause__`` of their ``CancelledError``
    :param unless_running: leave a future whose work was claimed pending (its thread will
        settle it)
    :return: ``False`` if it was already done (or running, with ``unless_running``)
    """
    return future._complete(_CANCELLED, None, cause, unless_running=unless_running)


def is_finished(future: Future[Any]) -> bool:
    """Whether ``future`` completed with a value (not an error, not cancelled)."""
    return future._state == _FINISHED


def has_failed(future: Future[Any]) -> bool:
    """Whether ``future`` completed with an error of its work."""
    return future._state == _FAILED


def mark_retrieved(future: Future[Any]) -> None:
    """Count ``future``'s error as retrieved: it is not logged when the future is dropped
    (for followers of foreign futures, whose source owns the error)."""
    future._retrieved = True


def is_unretrieved_failure(future: Future[Any]) -> bool:
    """Whether ``future`` failed and nobody has retrieved its error yet."""
    return future._state == _FAILED and not future._retrieved


def take_unretrieved_error(future: Future[Any]) -> BaseException | None:
    """Return the error of a failed future that nobody retrieved, now counted as retrieved
    (a scope reports it); else ``None``."""
    if future._state != _FAILED or future._retrieved:
        return None
    future._retrieved = True
    return future._exception


def _take_report_at_exit(future: Future[Any]) -> tuple[str, BaseException] | None:
    """The report of a failed future still alive and unread at exit, now counted as
    retrieved (see _reports.py: free-threaded 3.13 finalizes it too late to report)."""
    exception = take_unretrieved_error(future)
    return None if exception is None else (repr(future), exception)


def has_callbacks(future: Future[Any]) -> bool:
    """Whether something waits for ``future`` through a done callback (a ``collect_all``,
    ``as_completed``, ``then``, an awaiting task)."""
    return bool(future._callbacks)


def keep_alive(future: Future[Any], obj: object) -> None:
    """Keep ``obj`` alive as long as ``future`` (a foreign future it follows)."""
    future._keep_alive = obj


def stealable(future: Future[Any]) -> bool:
    """Whether ``future`` has work a waiter could run itself (a sync fork not yet done;
    :func:`steal` does nothing if a worker has started it meanwhile)."""
    work = future._work
    return work is not None and work.stealable


def steal(future: Future[Any]) -> None:
    """Run ``future``'s work in this thread if it can be and has not started (the helping
    done by ``wait_all`` and the exit join; untimed waits only)."""
    work = future._work
    if work is not None and work.stealable:
        run_inline(work)


def block_until_done(future: Future[Any], timeout: float | None) -> None:
    """Block this thread until ``future`` is done, without reading its outcome.

    :raises TimeoutError: if ``timeout`` elapses first
    :raises WouldBlockError: on an event loop's thread
    """
    future._block_until_done(timeout)


def abandon_in_child(future: Future[Any]) -> None:
    """In a child made by ``os.fork``: this pending fork belongs to the parent, whose
    threads the child does not have. Read it as cancelled; run none of its callbacks."""
    future._abandon_in_child()
