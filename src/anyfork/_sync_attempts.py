"""The runner of an options-wrapped sync or remote fork (``_attempts`` routes it here).

* No deadline (and not remote): all its attempts run one after the other in the one job of
  the fork's own future (:class:`AttemptsInThread`), started at once, or from the done
  callback of its limit's ticket (:class:`SyncRun` waits in line, holding no thread); the
  thread running it holds the place as its slot, which its blocking waits give back.
* A deadline (or a remote callable, or eager mode): each attempt is a future and a job of
  its own (``_sync_job.submit_attempt``) or a call sent away (``_remote.send_attempt``),
  which :class:`SyncRun` reads: it settles the user's future, or starts the next attempt,
  or, at the deadline (``_deadlines``), fails the future with :class:`TimeoutError`, leaves
  the limit's line, cancels an attempt not yet started and asks a running one to stop.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from anyio.lowlevel import EventLoopToken

from ._blocking import Slot, current_slot, run_in_slot
from ._cancel import request_stop
from ._deadlines import deadlines
from ._debug import show_attempts
from ._errors import CancelledError
from ._exit import exit_join
from ._future import Future
from ._limits import Limit, LimitSlot
from ._options import WithOptions
from ._remote import RemoteCallable, remote_call, send_attempt
from ._retries import AttemptState, chain_earlier, retried, timeout_error
from ._scope import current_scope_group
from ._state import (
    Work,
    attach,
    claim,
    on_done,
    release_claim,
    settle,
    settle_cancelled,
    settle_failed,
)
from ._sync_job import SyncJob, loop_token_here, submit_attempt
from ._torch import capture_grad_mode

__all__ = ["AttemptsInThread", "SyncRun"]

logger = logging.getLogger("anyfork")


class SyncRun(Work):
    """The work attached to the future of an options-wrapped sync or remote fork."""

    __slots__ = (
        "_args",
        "_context",
        "_deadline",
        "_eager",
        "_earlier",
        "_future",
        "_grad_mode",
        "_holding",
        "_job",
        "_kwargs",
        "_lock",
        "_options",
        "_remote",
        "_state",
        "_ticket",
        "_timer",
        "_token",
        "attempt",
        "kind",
        "stealable",
    )

    def __init__(
        self,
        future: Future[Any],
        options: WithOptions[..., Any],
        deadline: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        native: object | None,
        eager: bool,
    ) -> None:
        self._future: Future[Any] | None = future
        self._options = options
        self._deadline = deadline
        self._args = args
        self._kwargs = kwargs
        self._eager = eager
        self._remote: RemoteCallable | None = None
        self.kind = "worker thread"
        remote = remote_call(options.func, args, kwargs)
        if remote is not None:
            self._remote, self._args, self._kwargs = remote
            self.kind = "remote"
        self._context = contextvars.copy_context()
        self._grad_mode = capture_grad_mode()
        group = current_scope_group()
        self._token: EventLoopToken | None
        if group is not None and group.track_sync_fork(future):
            self._token = group.token
        else:
            self._token = loop_token_here(native)
        self._lock = threading.Lock()
        self._state = AttemptState()
        self._ticket: Future[None] | None = None
        self._job: SyncJob | None = None
        self.attempt: Future[Any] | None = None
        self._earlier: list[BaseException] = []
        self._timer: list[Any] | None = None
        self._holding = False  # a place in the limit, taken for this fork
        # A waiter may run an attempt itself (no thread hop), unless there is a deadline:
        # work run in the waiter's thread could not be left behind at the deadline.
        self.stealable = deadline is None and self._remote is None

    def start(self, ticket: Future[None] | None = None) -> None:
        """Start: take a place (or wait in line with ``ticket``, if one was taken)."""
        future = self._future
        assert future is not None
        if not self._eager:
            exit_join.track(future)  # a queued fork holds the exit until it has run
        attach(future, self)
        show_attempts(future, self._state)
        on_done(future, self._forget)
        if self._deadline is not None:
            self._timer = deadlines.add(self._deadline, self._expire)
        limit = self._options.limit
        if ticket is None and limit is not None:
            ticket = limit.take_or_queue()
        if ticket is None:
            self._holding = limit is not None
            self._start_attempt()
            return
        self._state.queued = True
        self._ticket = ticket
        on_done(ticket, self._granted)

    # --- Work -----------------------------------------------------------------------

    def state(self, future: Future[Any]) -> str:
        if self._state.queued:
            return "queued"
        attempt = self.attempt
        if attempt is None:
            return "queued"
        return "running" if self._remote is not None else Work.state(self, attempt)

    def steal(self) -> None:
        job = self._job
        if job is not None:
            job.steal()

    def awaited(self) -> None:
        pass

    def cancel(self, future: Future[Any]) -> None:
        self._stop(future)

    def ask_to_stop(self, future: Future[Any]) -> None:
        # cancel() found the fork running (an attempt in a worker thread): the request
        # goes to that attempt's job, which the work checks.
        self._ask_attempt_to_stop()

    def _ask_attempt_to_stop(self) -> None:
        # The attempt's future was made here, not by fork(): its job is reached directly.
        job, attempt = self._job, self.attempt
        if job is not None and attempt is not None:
            job.ask_to_stop(attempt)

    # --- the attempts ---------------------------------------------------------------

    def _granted(self, ticket: Future[None]) -> None:
        self._ticket = None
        if ticket.cancelled():
            return
        self._holding = True
        self._state.queued = False
        if self._future is None or self._future.done():  # ended while queued
            self._release()
            return
        self._start_attempt()

    def _start_attempt(self) -> None:
        future = self._future
        if future is None:
            self._release()
            return
        if self._deadline is None and not self._eager and self._remote is None:
            # Its attempts run in one job of its own future (see fork_with_options), which
            # now holds the place.
            with self._lock:
                self._holding = False
            body = AttemptsInThread(self._options, future, self._state)
            job = self._job = submit_attempt(
                future,
                body,
                self._args,
                self._kwargs,
                self._context,
                self._grad_mode,
                self._token,
            )
            body.job = job
            attach(future, body)
            return
        self._state.attempt += 1
        attempt: Future[Any] = Future(name=future.name)
        self.attempt = attempt
        del future
        if self._eager:
            self._run_here(attempt)
            return
        try:
            if self._remote is not None:
                send_attempt(attempt, self._remote, self._args, self._kwargs)
            else:
                self._job = submit_attempt(
                    attempt,
                    self._body,
                    self._args,
                    self._kwargs,
                    self._context,
                    self._grad_mode,
                    self._token,
                )
        except BaseException as exc:  # ShutdownError, arguments that cannot be sent
            settle_failed(attempt, exc)
        on_done(attempt, self._attempt_done)

    def _run_here(self, attempt: Future[Any]) -> None:
        """Eager mode: run the attempt now, in this thread."""
        try:
            func = self._body if self._remote is None else cast("Callable[..., Any]", self._remote)
            result = self._context.run(func, *self._args, **self._kwargs)
        except BaseException as exc:
            settle_failed(attempt, exc)
        else:
            settle(attempt, result)
        self._attempt_done(attempt)

    def _body(self, *args: Any, **kwargs: Any) -> Any:
        """One attempt, in the thread that runs it: the fork's future is claimed (so that
        ``cancel()`` returns False while it runs, as for any running sync fork), and the
        thread holds the fork's place in its limit (given back while it blocks)."""
        future = self._future
        if future is None or not claim(future):
            raise _NotStarted
        try:
            limit = self._options.limit
            if limit is None:
                return self._options.func(*args, **kwargs)
            slot = LimitSlot(limit, current_slot())
            return run_in_slot(slot, self._options.func, *args, **kwargs)
        finally:
            release_claim(future)
            del future

    def _attempt_done(self, attempt: Future[Any]) -> None:
        self._job = None
        error: BaseException | None = None
        result: Any = None
        try:
            result = attempt.value()
        except BaseException as exc:  # read here, so it never reports as unretrieved
            error = exc
        future = self._future
        if future is None or future.done():  # timed out or cancelled meanwhile
            if not attempt.cancelled() and not isinstance(error, _NotStarted):
                _log_late(self._options.name, error)
            self._release()
            return
        if error is None:
            self._release()
            settle(future, result)
            return
        if isinstance(error, CancelledError) and attempt.cancelled():
            self._release()
            settle_cancelled(future, error.__cause__)
            return
        earlier = self._earlier
        if retried(self._options, error, self._state.attempt) and not self._past_deadline():
            earlier.append(error)
            self._start_attempt()
            return
        chain_earlier(error, earlier)
        self._release()
        settle_failed(future, error)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _expire(self) -> None:
        """The deadline passed (in the timer's thread)."""
        future = self._future
        if future is None or not settle_failed(future, timeout_error(self._options)):
            return
        self._stop(future)

    def _stop(self, future: Future[Any]) -> None:
        """``future``, the fork's, ended (deadline, cancel): leave the line, stop the
        attempt."""
        ticket = self._ticket
        if ticket is not None:
            # If a place was taken for it meanwhile, _granted gives it back.
            self._ticket = None
            self._state.queued = False
            self._options.limit.leave_line(ticket)  # type: ignore[union-attr]
        attempt = self.attempt
        # A running attempt cannot be cancelled: it may see the request, else it runs on.
        if attempt is not None and not attempt.done() and not attempt.cancel():
            self._ask_attempt_to_stop()
            request_stop(future)

    def _release(self) -> None:
        """The attempts are over: give the place back (once)."""
        with self._lock:
            if not self._holding:
                return
            self._holding = False
        self._options.limit.release()  # type: ignore[union-attr]

    def _forget(self, future: Future[Any]) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            deadlines.cancel(timer)
        self._future = None


class AttemptsInThread(Work):
    """All the attempts of a sync fork with no deadline, one after the other in the one job
    of its future, holding its place in the limit (if any) as the slot of the thread that
    runs it (it is a ``_blocking.Slot``, like ``_limits.LimitSlot``); the place is given
    back at the end, or if the fork is cancelled before its job runs.

    Under a limit it is also the work attached to the future, standing for the job
    (:class:`~anyfork._sync_job.SyncJob`): cancelling gives the place back too."""

    __slots__ = ("_options", "_outer", "_pledge", "_state", "job")

    stealable = True
    kind = "worker thread"

    def __init__(
        self, options: WithOptions[..., Any], future: Future[Any], state: AttemptState | None
    ) -> None:
        self._options = options
        self._state = state
        limit = options.limit
        # Holds the limit until the job or its cancellation takes it out (list.pop is
        # atomic): whoever does gives the place back.
        self._pledge: list[Limit] = [] if limit is None else [limit]
        self.job: Work = self  # until its job is made
        self._outer: Slot | None = None
        if state is not None:
            show_attempts(future, state)

    def steal(self) -> None:
        self.job.steal()

    def awaited(self) -> None:
        self.job.awaited()

    def cancel(self, future: Future[Any]) -> None:
        self.job.cancel(future)
        self.never_started()

    def ask_to_stop(self, future: Future[Any]) -> None:
        # cancel() found the fork running: its job (the fork's StopState) takes the request.
        job = self.job
        if job is not self:
            job.ask_to_stop(future)

    # The slot of the thread running the job (``_blocking.Slot``), the place in the limit
    # chained before the thread's own slot, as a ``LimitSlot`` (one object fewer a fork).

    def release(self) -> None:
        if self._outer is not None:
            self._outer.release()
        self._options.limit.release()  # type: ignore[union-attr]

    def reacquire(self) -> None:
        LimitSlot(self._options.limit, self._outer).reacquire()  # type: ignore[arg-type]

    def wait_untimed(self, event: threading.Event) -> bool:
        if self._outer is not None:
            return self._outer.wait_untimed(event)
        return event.wait()

    def never_started(self) -> None:
        """The fork was cancelled before its job ran: give its place back."""
        try:
            limit = self._pledge.pop()
        except IndexError:  # the job ran: it gave the place back
            return
        limit.release()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        options = self._options
        limit: Limit | None = None
        if options.limit is not None:
            try:
                limit = self._pledge.pop()
            except IndexError:  # pragma: no cover - its future was completed by hand
                return None
        try:
            if not options.retries:  # the common case, with no extra frame
                if limit is None:
                    return options.func(*args, **kwargs)
                self._outer = current_slot()
                return run_in_slot(self, options.func, *args, **kwargs)
            state, earlier = self._state, list[BaseException]()
            assert state is not None
            while True:
                state.attempt += 1
                try:
                    return self._attempt(limit, args, kwargs)
                except Exception as exc:
                    if retried(options, exc, state.attempt):
                        earlier.append(exc)
                        continue
                    chain_earlier(exc, earlier)
                    raise
        finally:
            if limit is not None:
                limit.release()

    def _attempt(self, limit: Limit | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        func = self._options.func
        if limit is None:
            return func(*args, **kwargs)
        self._outer = current_slot()
        return run_in_slot(self, func, *args, **kwargs)


class _NotStarted(Exception):
    """An attempt whose fork ended before a thread took it (it never ran)."""


def _log_late(name: str, error: BaseException | None) -> None:
    logger.debug(
        "fork %r finished after its future was done (its deadline passed, or it was "
        "cancelled); its late %s was discarded",
        name,
        "result" if error is None else f"error {error!r}",
    )
