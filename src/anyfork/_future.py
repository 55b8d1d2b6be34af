"""``Future[T]``: a thread-safe result holder that can be waited on blocking or awaited.

The future knows nothing about where its work runs. Its state, the one way to complete it,
and the small internal API through which the code that runs work attaches it and settles
the future are ``_state.py``'s (:class:`~anyfork._state.FutureState`, its base). This module
is the face every caller sees: reading, blocking waits, ``await``, callbacks, ``then``.
"""

# The functions after the class are this module's own access to Future's state, on its
# behalf: pyright's class-based privacy check does not fit them.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, NoReturn, TypeVar, cast

from typing_extensions import Never

from . import _blocking, _loops
from ._blocking import held_by_task, inline, max_inline_depth, may_run_inline, run_inline
from ._callbacks import check_callable, help_pending_dispatch
from ._errors import AlreadyCompletedError, CancelledError, NotReadyError, WouldBlockError
from ._reports import report_unretrieved
from ._state import CANCELLED as _CANCELLED
from ._state import FAILED as _FAILED
from ._state import FINISHED as _FINISHED
from ._state import PENDING as _PENDING
from ._state import Callback, FutureState, Record, Work
from ._then import ThenCallback
from ._validate import check_timeout

__all__ = ["Future", "block_until_done"]

T = TypeVar("T")
S = TypeVar("S")

_STATE_NAMES = {
    _PENDING: "pending",
    _FINISHED: "finished",
    _FAILED: "failed",
    _CANCELLED: "cancelled",
}


class Future(FutureState[T]):
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

    __slots__ = ("__weakref__", "name")

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
        # Set for forks (see _debug.note_forked): when, and in debug mode where, it was made.
        self._fork_record: Record | None = None
        # An object that must live as long as this future (a foreign future it follows).
        self._keep_alive: object = None

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        state = _STATE_NAMES[self._state]
        if self._state == _PENDING and self._running:
            state = "running"
        record = self._fork_record
        site = f" forked at {record[1]}" if record is not None and record[1] else ""
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
        then_callback = ThenCallback(callback, child)
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
        A sync fork already running in a thread cannot be interrupted: it is *asked to
        stop* (it sees the request through :func:`anyfork.check_cancelled`) and ``False``
        is returned, as with :mod:`concurrent.futures`; the future ends cancelled if the
        work lets the ``CancelledError`` propagate.

        :return: ``True`` if the future is now cancelled, ``False`` if it was already done
            or its work is running and cannot be interrupted
        """
        work = self._work
        if not self._complete(_CANCELLED, None, None, unless_running=True):
            if work is not None and self._state == _PENDING:  # running: ask it to stop
                work.ask_to_stop(self)
            return False
        if work is not None:
            work.cancel(self)
        return True


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


def block_until_done(future: Future[Any], timeout: float | None) -> None:
    """Block this thread until ``future`` is done, without reading its outcome.

    :raises TimeoutError: if ``timeout`` elapses first
    :raises WouldBlockError: on an event loop's thread
    """
    future._block_until_done(timeout)
