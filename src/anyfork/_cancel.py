"""Asking a running sync fork to stop, and the work seeing it.

A sync fork already running in a worker thread cannot be interrupted: it can only be
**asked to stop**, and see the request the next time it checks, with :func:`check_cancelled`
or :func:`cancelled` (or ``anyio.from_thread.check_cancelled()``, see ``_loops``).

Whoever decides a running fork should stop calls :func:`request_stop` (a deadline) or
``Future.cancel()``, which a scope's ``cancel()``, a scope's exit on cancellation (an
enclosing anyio cancel scope) and FastAPI's cancel-on-disconnect all go through.

The request is a flag on the fork's job (:class:`StopState`, which ``_sync_job.SyncJob``
extends), set from any thread; the work finds its job in a per-thread cell that the job
sets while its work runs, so a check costs a thread-local read and a few attribute reads. A
fork whose future is already done (completed by a deadline, or by hand) counts as asked to
stop as well: nobody would see its result. A request also reaches the sync forks a fork made
while it ran (its sub-work, in its scope), transitively: each one links to the fork that
made it, and sees the request through that link.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import weakref
from typing import Any

from . import _loops
from ._errors import CancelledError
from ._future import Future
from ._state import fork_record

__all__ = [
    "ForkCell",
    "StopState",
    "cancelled",
    "check_cancelled",
    "is_cancellation",
    "request_stop",
    "running",
    "stop_requested",
]


class ForkCell:
    """One per thread: the stop state (job) of the sync fork whose work runs in it, if any.

    A waiter that runs another fork inline sets it for that run and puts it back after. A
    plain object's slot, not the thread-local itself: a store into a thread-local costs
    three times as much, and a sync fork's run makes two.
    """

    __slots__ = ("fork",)

    def __init__(self) -> None:
        self.fork: StopState | None = None


class _Running(threading.local):
    def __init__(self) -> None:  # called once in each thread that reads it
        self.cell = ForkCell()


#: ``running.cell.fork``: the sync fork whose work runs in this thread.
running = _Running()


class StopState:
    """Whether one sync fork was asked to stop: set from any thread, read by its work.

    Made in the thread that forks, it links to the sync fork running there, if any (its
    parent): a request to the parent reaches it too. ``future`` is set only while the work
    runs (the job sets and clears it).
    """

    __slots__ = ("asked", "future", "parent")

    def __init__(self) -> None:
        self.asked = False
        self.parent: StopState | None = running.cell.fork
        self.future: Future[Any] | None = None

    def ask_to_stop(self, future: Future[Any]) -> None:
        """Record that the work should stop (any thread, never blocks)."""
        self.asked = True

    def stop_asked(self) -> bool:
        """Whether this fork, or the fork that made it (transitively, while that one still
        runs), was asked to stop, or its future is already done."""
        state: StopState | None = self
        while state is not None:
            if state.asked:
                self.asked = True  # a parent's request stands: no need to walk again
                return True
            future = state.future
            if future is not None and future.done():
                self.asked = True
                return True
            state = state.parent
        return False


def request_stop(future: Future[Any]) -> None:
    """Ask the work behind ``future`` to stop, if it is a sync fork (running, or queued:
    it starts anyway); it sees the request the next time it checks, and so do the sync
    forks it made. Work that never checks runs on. Never blocks; harmless on any other future
    and on a future that is done (a fork whose future is completed by other means, e.g.
    with a ``TimeoutError`` at its deadline, counts as asked to stop anyway)."""
    with _lock:
        _requested.add(future)
    record = fork_record(future)
    if record is not None and record[1] is not None:
        record[1].ask_to_stop(future)


def stop_requested(future: Future[Any]) -> bool:
    """Whether :func:`request_stop` was called for ``future``, or ``cancel()`` asked its
    running sync fork to stop (for tests and ``pending()``-style views; not the hot path)."""
    with _lock:
        if future in _requested:
            return True
    record = fork_record(future)
    work = None if record is None else record[1]
    return isinstance(work, StopState) and work.asked


# The futures request_stop was called for (weakly): a deadline may call it on a future it
# has already completed, whose work the future no longer names.
_lock = threading.Lock()
_requested: weakref.WeakSet[Future[Any]] = weakref.WeakSet()


def cancelled() -> bool:
    """Return whether the sync fork running this code has been asked to stop.

    Cheap enough for the inner loop of a generation or a training step (a thread-local
    read and a few attribute reads). ``False`` outside a sync fork: in a coroutine, on an
    event loop's thread, in a thread that anyfork did not start.

    A sync fork is asked to stop by ``fut.cancel()`` while it runs, by its scope's
    ``cancel()``, by its scope being cancelled (an enclosing anyio cancel scope, a FastAPI
    request whose client went away), by its deadline, and by a request to the sync fork that
    made it. Use :func:`check_cancelled` to stop by raising.

    Example::

        def generate(prompt: str, steps: int) -> list[str]:
            tokens: list[str] = []
            for _ in range(steps):
                if anyfork.cancelled():
                    break  # keep what was generated so far
                tokens.append(next_token(prompt, tokens))
            return tokens
    """
    fork = running.cell.fork
    if fork is None:
        return False
    if fork.asked:
        return True
    if fork.parent is None:  # the common case, spelled out: no call, no loop
        future = fork.future
        return future is not None and future.done()
    return fork.stop_asked()


def check_cancelled() -> None:
    """Raise :class:`~anyfork.CancelledError` if the sync fork running this code has been
    asked to stop; else do nothing.

    Call it between units of work (layers, generation steps, batches): a running sync
    fork cannot be interrupted, only asked to stop (see :func:`cancelled` for what asks
    it). Work that lets the error propagate ends its future **cancelled**, not failed.
    Outside a sync fork it returns ``None``, so library code may call it anywhere.

    Inside a sync fork made from an event loop, ``anyio.from_thread.check_cancelled()``
    raises too (the loop's own cancellation exception), as in ``anyio.to_thread.run_sync``.

    :raises CancelledError: if the running sync fork was asked to stop

    Example::

        def forward(model: Model, x: Tensor) -> Tensor:
            for layer in model.layers:
                anyfork.check_cancelled()
                x = layer(x)
            return x
    """
    if cancelled():
        raise CancelledError(_asked_to_stop(running.cell.fork))


def _asked_to_stop(fork: StopState | None) -> str:
    future = None if fork is None else fork.future
    name = "this sync fork" if future is None else f"sync fork {future.name!r}"
    return (
        f"{name} was asked to stop (cancelled, its scope cancelled, past its deadline, or "
        "the sync fork that made it was)"
    )


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation a sync fork's work may let propagate once asked
    to stop: anyfork's, or the loop's (from ``anyio.from_thread.check_cancelled()``)."""
    if isinstance(exc, (CancelledError, asyncio.CancelledError)):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.Cancelled)


# anyio.from_thread.check_cancelled() in a sync fork of a loop asks this (see _loops).
_loops.set_stop_check(cancelled)


def _forget_in_child() -> None:
    # A child made by os.fork inside a sync fork: that fork runs in the parent, not here.
    running.cell.fork = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_in_child)
