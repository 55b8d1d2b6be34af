"""The exit join: waiting, at interpreter exit, for forks that have not finished.

Every sync fork is tracked here from the moment it is forked (it runs on the worker pool,
which outlives any event loop), and so is every fork of the background loop, through that
loop's participation (``_background.py``). At exit, before Python joins non-daemon
threads, :meth:`ExitJoin.join` waits for them within the exit bound, then stops the
participants. Non-daemon threads still running then keep the program working, as Python
does: the join then waits until they have ended (it runs as an atexit handler instead).
Nothing here imports the modules that run work: they come to it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from . import _pool
from ._config import current_config
from ._errors import ShutdownError
from ._future import Future, block_until_done
from ._reports import report_unretrieved
from ._state import (
    abandon_in_child,
    has_callbacks,
    is_unretrieved_failure,
    on_done,
    steal,
    take_unretrieved_error,
)

__all__ = [
    "EXIT_STOP_GRACE",
    "ExitParticipant",
    "StopAtExit",
    "exit_join",
    "exit_join_started",
]

logger = logging.getLogger("anyfork")

# Set when the exit join starts (tests wait for it to interrupt the join).
exit_join_started = threading.Event()


class ExitParticipant(Protocol):
    """Something with forks of its own to join at exit, stopped once the join is over."""

    def pending_futures(self) -> list[Future[Any]]:
        """The forks it still has pending."""
        ...

    def stop(self, timeout: float | None) -> None:
        """Stop, after the join, within ``timeout`` seconds: its share of the exit bound
        (``None``: no bound, take as long as stopping takes). What has not stopped by then
        is abandoned, never waited for."""
        ...


class _Stoppable(Protocol):
    def stop(self, timeout: float | None = None) -> None: ...


class StopAtExit:
    """The exit join's participant for a connection to a cluster: it stops the connection
    ``current`` gives (None: no connection) once the join is over. The join tracks the
    connection's forks itself (``send_attempt``)."""

    __slots__ = ("_current",)

    def __init__(self, current: Callable[[], _Stoppable | None]) -> None:
        self._current = current

    def pending_futures(self) -> list[Future[Any]]:
        return []  # every remote fork is tracked by the exit join itself

    def stop(self, timeout: float | None = None) -> None:
        connection = self._current()
        if connection is not None:
            connection.stop(timeout)


class ExitJoin:
    """What must finish before the interpreter exits, and the join that waits for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # Insertion-ordered (a dict used as a set): the join goes through forks in order.
        self._pending: dict[Future[Any], None] = {}
        self._participants: list[ExitParticipant] = []
        self._hook_registered = False
        self._over = False
        # Set by discard() while the join waits for the done callbacks of finished forks.
        self._discarded = threading.Event()
        self._joining = False
        # Torch futures' callbacks still held by torch, and the followers they complete
        # (see track_hand_off).
        self._hand_offs: dict[Future[None], weakref.ref[Future[Any]]] = {}

    def check_open(self) -> None:
        """Raise :class:`ShutdownError` if nothing would wait for new work at exit any more;
        else make sure the join will run."""
        if self._over:
            raise ShutdownError(
                "anyfork cannot start new work: the interpreter is shutting down and "
                "anyfork's exit join has ended. Fork before the end of the script, or wait "
                "for the fork inside the work that makes it."
            )
        if not self._hook_registered:
            with self._lock:
                if self._hook_registered:
                    return
                # Runs before threads are joined at exit, unlike atexit.register.
                try:
                    threading._register_atexit(self._at_threads_exit)  # type: ignore[attr-defined]
                except RuntimeError:
                    if _python_waits_for_this_thread():
                        # The main thread has returned and Python waits for this thread
                        # (and maybe others) to end: the program still works until they
                        # do, and atexit handlers run after that.
                        atexit.register(self.join)
                        self._hook_registered = True
                        return
                    raise ShutdownError(
                        "anyfork cannot start new work: the interpreter is already shutting "
                        "down (forking from an atexit handler or a finalizer), so nothing "
                        "would wait for it to finish. Fork before the end of the script, or "
                        "call the function directly."
                    ) from None
                self._hook_registered = True

    def track(self, future: Future[Any], *, forget_when_done: bool = True) -> None:
        """Have the join wait for ``future`` until it is done.

        :param forget_when_done: ``False`` for work that calls :meth:`discard` itself once
            it is over (a sync fork's job does: cheaper than a done callback per fork)
        :raises ShutdownError: if the join is over (see :meth:`check_open`)
        """
        if self._over or not self._hook_registered:
            self.check_open()
        # Every sync fork comes through here, so no lock: one dict operation is atomic, and
        # copies of the dict are made in one step too (list(), under the GIL).
        self._pending[future] = None
        if forget_when_done:
            on_done(future, self.discard)

    def track_hand_off(self, follower: Future[Any], released: Future[None]) -> None:
        """Have the join wait until ``released`` is done (torch has let go of the callback
        that completes ``follower``), but only if, at exit, something still consumes the
        follower through a done callback (``collect_all``, ``as_completed``): then torch's
        thread is busy with work somebody will read, and the interpreter must not finalize
        under it. The follower is not a fork: a timed wait that gave up on a torch future
        that never completes does not hold the exit.

        :raises ShutdownError: if the join is over (see :meth:`check_open`)
        """
        if self._over or not self._hook_registered:
            self.check_open()
        self._hand_offs[released] = weakref.ref(follower)
        on_done(released, self._forget_hand_off)

    def _forget_hand_off(self, released: Future[Any]) -> None:
        self._hand_offs.pop(released, None)

    def _hand_offs_to_wait_for(self) -> list[Future[None]]:
        waited: list[Future[None]] = []
        for released, follower_ref in list(self._hand_offs.items()):
            follower = follower_ref()
            if not released.done() and follower is not None and has_callbacks(follower):
                waited.append(released)
        return waited

    def discard(self, future: Future[Any]) -> None:
        """Stop tracking ``future``: its work is over, done callbacks included (or it will
        never run)."""
        self._pending.pop(future, None)
        if self._joining:
            self._discarded.set()

    def tracked(self) -> list[Future[Any]]:
        """The futures the join would wait for now, its participants' included (a snapshot)."""
        return self._unfinished()

    def add_participant(self, participant: ExitParticipant) -> None:
        with self._lock:
            self.check_open()
            if participant not in self._participants:
                self._participants.append(participant)

    def _unfinished(self) -> list[Future[Any]]:
        with self._lock:
            participants = list(self._participants)
        unfinished = list(self._pending)
        for participant in participants:
            unfinished.extend(participant.pending_futures())
        return [future for future in unfinished if not future.done()]

    def _at_threads_exit(self) -> None:
        """The hook Python calls once the main thread has returned, before it waits for
        the non-daemon threads.

        While non-daemon threads still run, the program still works (Python waits for
        them), and their forks must too: the join then runs as an atexit handler, after
        they have ended. (Waiting for them here could wait for a thread that only ends
        through a hook run after this one, a ``ThreadPoolExecutor``'s.)
        """
        if _other_non_daemon_threads():
            atexit.register(self.join)
        else:
            self.join()

    def join(self) -> None:
        """Wait (within the exit bound) for every unfinished fork, then stop the participants.

        With a bound, the join only waits: it runs no fork inline, since a fork run inline
        cannot be stopped at the bound. Without one, it runs queued sync forks itself.
        """
        bound = current_config().exit_timeout
        deadline = None if bound is None else time.monotonic() + bound
        interrupted = False
        # The fork the join is helping with or waiting for: without a bound the join runs
        # it in this thread if no worker has started it, where a Ctrl-C interrupts it.
        current: Future[Any] | None = None
        try:
            # Inside the try: a Ctrl-C that lands right after this still ends the join.
            exit_join_started.set()
            # Sync forks made on a loop that never got control again: queue them now.
            _pool.hand_over_deferred()
            if deadline is None:
                # Without a bound, help first: run the sync forks no worker has started yet,
                # from the last one back, as wait_all does.
                for current in reversed(self._unfinished()):
                    steal(current)
            while unfinished := self._unfinished():
                for current in unfinished:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    # Only wait: reading the outcome would hide a failure nobody retrieved.
                    block_until_done(current, None if remaining is None else max(remaining, 0))
            current = None
            self._wait_for_done_callbacks(deadline)
            self._wait_for_hand_offs(deadline)
        except TimeoutError:
            self._give_up(
                f"did not finish within the exit bound of {bound} seconds "
                "(anyfork.configure(exit_timeout=...), ANYFORK_EXIT_TIMEOUT)"
            )
        except KeyboardInterrupt as exc:
            interrupted = True
            self._give_up("were interrupted at exit (Ctrl-C)", _ran_here(current, exc))
        except SystemExit as exc:
            interrupted = True
            why = "were interrupted at exit (SystemExit raised by a fork the join ran)"
            self._give_up(why, _ran_here(current, exc))
        finally:
            with self._lock:
                self._over = True
                participants, self._participants = self._participants, []
            _stop_participants(participants, _stop_deadline(deadline, interrupted=interrupted))

    def _wait_for_done_callbacks(self, deadline: float | None) -> None:
        """Wait until the sync forks that are done have also run their done callbacks.

        A fork's future is done before its callbacks run, in the worker thread that
        completed it (a ``then`` step, ``to_torch``'s hand-on): leaving then would let the
        interpreter finalize under that daemon thread, cut the callback short and, with
        torch, abort the process. A job tells the join it is over only once its callbacks
        have returned (:meth:`discard`).
        """
        self._joining = True
        try:
            while True:
                self._discarded.clear()
                if not self._pending:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                # Short slices: a Ctrl-C in the main thread gets through between them.
                self._discarded.wait(_POLL if left is None else min(_POLL, left))
        finally:
            self._joining = False

    def _wait_for_hand_offs(self, deadline: float | None) -> None:
        """Wait until torch has let go of the callbacks of the torch futures whose followers
        something still consumes (see :meth:`track_hand_off`)."""
        for released in self._hand_offs_to_wait_for():
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            block_until_done(released, remaining)

    def _give_up(self, why: str, ran_here: Future[Any] | None = None) -> None:
        """Log what the join leaves unfinished, and cancel what can be.

        :param ran_here: the fork the join was running in this thread when it was
            interrupted: over now (it failed with the interrupt), but interrupted all the same
        """
        unfinished = self._unfinished()
        if ran_here is None and not unfinished:
            if not self._pending and self._hand_offs_to_wait_for():
                logger.warning(
                    "torch work handed to anyfork was still running at exit (%s); "
                    "torch may abort the process when it ends",
                    why,
                )
                return
            if self._pending:
                logger.error(
                    "the done callbacks of %d fork(s) %s; abandoning them: %s",
                    len(self._pending),
                    why,
                    ", ".join(repr(future) for future in list(self._pending)),
                )
                return
        named = unfinished if ran_here is None else [ran_here, *unfinished]
        logger.error(
            "%d fork(s) %s; cancelling those that can be, abandoning the rest: %s",
            len(named),
            why,
            ", ".join(repr(future) for future in named),
        )
        for future in unfinished:
            future.cancel()

    def reset_in_child(self) -> None:
        """In a child made by ``os.fork``: the parent's forks are not the child's to join
        (their threads are not there); they read as cancelled in the child."""
        inherited = list(self._pending)
        self._lock = threading.RLock()
        self._pending = {}
        self._participants = []
        self._hand_offs = {}
        for future in inherited:
            abandon_in_child(future)


def _ran_here(future: Future[Any] | None, interrupt: BaseException) -> Future[Any] | None:
    """``future`` if the join ran it in this thread and ``interrupt`` (a KeyboardInterrupt
    or SystemExit) ended it there: the fork then failed with the very exception the join
    caught. Its error now counts as retrieved, since the join names the fork as interrupted
    (a report of a KeyboardInterrupt nobody retrieved would say it twice)."""
    if future is None or not is_unretrieved_failure(future):
        return None
    error = take_unretrieved_error(future)
    if error is interrupt:
        return future
    if error is not None:  # its own failure, in a worker, just before the interrupt: report it
        report_unretrieved(repr(future), error)
    return None


# --- sharing the exit bound out to the participants ---------------------------------------

#: Seconds the participants get in all to stop once the join is over, when the join used up
#: the exit bound (or was interrupted): closing a cluster anyfork started takes about a
#: second. So a process exits within ``exit_timeout`` plus this (docs/scripts.md).
EXIT_STOP_GRACE = 2.0


def _stop_deadline(join_deadline: float | None, *, interrupted: bool) -> float | None:
    """When the participants must have stopped: at the exit bound, or, if the join used it
    up (or was interrupted), :data:`EXIT_STOP_GRACE` seconds from now. ``None`` (no bound)
    only when there was none and the join ended on its own."""
    if join_deadline is None and not interrupted:
        return None
    grace_end = time.monotonic() + EXIT_STOP_GRACE
    return grace_end if join_deadline is None else max(join_deadline, grace_end)


def _stop_participants(participants: list[ExitParticipant], deadline: float | None) -> None:
    """Stop each participant in turn with its share of the time left: an equal part of it,
    plus what those before it left unused."""
    for position, participant in enumerate(participants):
        share = None
        if deadline is not None:
            share = max(deadline - time.monotonic(), 0.0) / (len(participants) - position)
        try:
            participant.stop(share)
        except KeyboardInterrupt:
            pass


def _other_non_daemon_threads() -> bool:
    """Whether a non-daemon thread other than this one and the main thread is alive."""
    current, main = threading.current_thread(), threading.main_thread()
    return any(
        not thread.daemon and thread is not current and thread is not main and thread.is_alive()
        for thread in threading.enumerate()
    )


def _python_waits_for_this_thread() -> bool:
    """Whether this is a non-daemon thread, other than the main one: a thread Python joins
    before the interpreter exits (rather than an atexit handler or a finalizer)."""
    current = threading.current_thread()
    return not current.daemon and current is not threading.main_thread() and current.is_alive()


# How long a slice of the wait for done callbacks lasts (see ExitJoin._wait_for_done_callbacks).
_POLL = 0.2

exit_join = ExitJoin()

if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=exit_join.reset_in_child)
