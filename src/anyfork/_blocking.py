"""Managed blocking and the inline-run policy: how a thread behaves while it waits.

Managed blocking is what keeps nested fork-and-wait from deadlocking at any
``worker_threads``: a worker thread that blocks in a wait gives its slot back for as long
as it waits (as fork-join pools and Dask's ``secede``/``rejoin`` do), so the work it waits
for, or the work that work waits for, always finds a slot. A worker thread registers its
slot with :func:`run_in_slot`; every blocking wait goes through :func:`secede`,
:func:`wait_for_event` and :func:`rejoin`. Threads of other pools (a Dask worker's) take
part through a blocking-wait hook (:func:`add_blocking_wait_hook`), registered by their
integration, so that this module imports none of them; a pool whose slots wait in a
special way (anyfork's worker pool helps with stranded work at exit) says so through the
slot itself (:meth:`Slot.wait_untimed`).

The inline-run policy decides when a waiting thread may run a sync fork's work itself
(work stealing): :func:`may_run_inline`, :func:`run_inline` and :data:`inline`.

Both are used by the Future (which knows nothing of threads or pools beyond this) and by
the worker pool; this module imports nothing of anyfork but ``_loops``.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar

from . import _loops

__all__ = [
    "BlockingWaitHook",
    "Departure",
    "Slot",
    "Stealable",
    "add_blocking_wait_hook",
    "TaskPlace",
    "block_on",
    "current_slot",
    "held_by_task",
    "inline",
    "max_inline_depth",
    "may_run_inline",
    "rejoin",
    "run_in_slot",
    "run_inline",
    "secede",
    "wait_for_event",
]


# --- managed blocking ------------------------------------------------------------------


class Slot(Protocol):
    """One unit of a bounded pool's capacity, held by the thread running a job."""

    def release(self) -> None:
        """Give the capacity back while the holder blocks (it runs no job meanwhile)."""

    def reacquire(self) -> None:
        """Take capacity again once the wait is over; may block until there is some."""

    def wait_untimed(self, event: threading.Event) -> bool:
        """Wait for ``event`` without a timeout, between release and reacquire (a pool
        may have its blocked threads help meanwhile); return ``True`` once it is set."""
        ...


class _CurrentSlot(threading.local):
    slot: Slot | None = None


_current = _CurrentSlot()


T = TypeVar("T")


def run_in_slot(slot: Slot, job: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``job(*args, **kwargs)`` in this thread, holding ``slot``: its blocking waits
    release it."""
    outer = _current.slot
    _current.slot = slot
    try:
        return job(*args, **kwargs)
    finally:
        _current.slot = outer


def current_slot() -> Slot | None:
    """The slot this thread holds now (a worker pool's, a limit's), else ``None``: a limit
    chains its place before it (``_limits.LimitSlot``)."""
    return _current.slot


class TaskPlace(Protocol):
    """A place in a limit held by a task (``_limits.TaskPlace``): the task's ``await`` of a
    pending future gives it back while it waits, as a thread's blocking wait gives back
    its slot."""

    def leave(self) -> bool:
        """Give the place back if the current task holds it; whether it did."""
        ...

    def rejoin(self) -> Generator[Any, Any, None]:
        """Take the place back once the wait is over (``yield from`` it)."""
        ...


#: The place in a limit that the current task holds, if any (set by a coroutine fork under
#: a limit). A task forked inside copies it, but :meth:`TaskPlace.leave` checks the holder.
held_by_task: contextvars.ContextVar[TaskPlace | None] = contextvars.ContextVar(
    "anyfork_held_by_task", default=None
)


#: Called before a blocking wait in any thread: returns the function to call once the wait
#: is over if this thread left a pool of its own (a Dask worker's task thread secedes),
#: else ``None``. It must be cheap where it does nothing: every blocking wait calls it.
BlockingWaitHook = Callable[[], "Callable[[], object] | None"]

_blocking_wait_hooks: list[BlockingWaitHook] = []


def add_blocking_wait_hook(hook: BlockingWaitHook) -> None:
    """Have every blocking wait call ``hook`` first (once per hook; see BlockingWaitHook)."""
    if hook not in _blocking_wait_hooks:
        _blocking_wait_hooks.append(hook)


class Departure:
    """What :func:`secede` gave back, for :func:`rejoin` to take again."""

    __slots__ = ("rejoins", "slot")

    def __init__(self, slot: Slot | None, rejoins: list[Callable[[], object]]) -> None:
        self.slot = slot
        self.rejoins = rejoins


def secede() -> Slot | Departure | None:
    """Before a blocking wait: a worker thread gives its slot back, and a thread of another
    pool leaves it through its hook; returns what :func:`rejoin` takes back, else None.

    Pair every call with :func:`rejoin` in a ``finally``.
    """
    slot = _current.slot
    if slot is not None:
        _current.slot = None  # a nested wait inside this one (a signal handler's) holds none
        slot.release()
    if not _blocking_wait_hooks:
        return slot
    rejoins = [rejoin for hook in _blocking_wait_hooks if (rejoin := hook()) is not None]
    return Departure(slot, rejoins) if rejoins else slot


def wait_for_event(
    departure: Slot | Departure | None, event: threading.Event, timeout: float | None
) -> bool:
    """``event.wait(timeout)``, between :func:`secede` (which gave ``departure``) and
    :func:`rejoin`. An untimed wait of a thread that held a slot waits through the slot
    (:meth:`Slot.wait_untimed`: anyfork's worker pool has it run queued work that no
    thread can take meanwhile)."""
    slot = departure.slot if isinstance(departure, Departure) else departure
    if timeout is None and slot is not None:
        return slot.wait_untimed(event)
    return event.wait(timeout)


def rejoin(slot: Slot | Departure | None) -> None:
    """After the wait: take back what :func:`secede` gave (a slot, another pool's place)."""
    if isinstance(slot, Departure):
        departure, slot = slot, slot.slot
        for rejoin_pool in reversed(departure.rejoins):
            rejoin_pool()
    if slot is not None:
        _current.slot = slot
        slot.reacquire()


# How often a blocking wait in the main thread wakes up to let a Ctrl-C through. The C-level
# SIGINT handler may run in any thread of the process; when it runs in a worker thread, the main
# thread's lock wait is not interrupted, and Python raises KeyboardInterrupt only once the main
# thread runs bytecode again.
_SIGNAL_POLL_INTERVAL = 0.2


def block_on(event: threading.Event, timeout: float | None, what: object) -> None:
    """Block this thread until ``event`` is set, as a managed blocking wait: between
    :func:`secede` and :func:`rejoin`, waking in the main thread to let a Ctrl-C through.

    :param timeout: seconds at most, ``None`` for no bound (already checked)
    :param what: what is waited for, named in the ``TimeoutError``
    :raises TimeoutError: if ``timeout`` elapses first
    """
    main_thread = threading.current_thread() is threading.main_thread()
    poll = _SIGNAL_POLL_INTERVAL if main_thread else None
    deadline = None if timeout is None else time.monotonic() + timeout
    slot = secede()
    try:
        while True:
            wait_for = poll
            if deadline is not None:
                left = max(deadline - time.monotonic(), 0)
                wait_for = left if poll is None else min(poll, left)
            if wait_for_event(slot, event, wait_for):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{what!r} was not done within {timeout} seconds")
    finally:
        rejoin(slot)


# Sync forks that call back into their loop (anyio.from_thread) block there: managed too.
_loops.set_managed_blocking(secede, rejoin)


# --- the inline-run policy ---------------------------------------------------------------


class _InlineDepth(threading.local):
    # How many forks this thread is running inline, one inside the other (a fork that
    # waits for a fork that waits for a fork...). Each level costs a few frames of the
    # thread's stack: past max_inline_depth() levels a waiter stops running forks inline and
    # blocks instead, and the fork runs on another worker thread with a fresh stack
    # (managed blocking frees a slot for it). So fork-and-wait recursion is not bounded by
    # the recursion limit.
    depth = 0


#: This thread's inline depth (``inline.depth``); ``Future.wait`` counts it itself, to keep
#: the frames of each level of a fork-and-wait recursion few.
inline = _InlineDepth()


def max_inline_depth() -> int:
    """How many forks a thread may run inline, one inside the other."""
    # A level costs four Python frames (anyfork.wait, Future.wait, the job, the work) and,
    # up to Python 3.11, where C calls count against the limit too, about as many C calls
    # (more with torch's grad-mode wrapper); the rest is left for the work's own calls.
    return sys.getrecursionlimit() // 16


class Stealable(Protocol):
    """Work a waiting thread can run itself (a sync fork's, see ``_state.Work``)."""

    def steal(self) -> None: ...


def run_inline(work: Stealable) -> None:
    """Run a sync fork's work in this waiting thread (work stealing), counting the depth."""
    inline.depth += 1
    try:
        work.steal()
    finally:
        inline.depth -= 1


def may_run_inline() -> bool:
    """Whether a blocking wait in this thread may run a sync fork itself.

    On an event loop's thread it always may, as ``torch.jit.wait`` does outside
    TorchScript: a sync fork made since the loop last got control (the job decides, see
    ``_SyncJob.steal``) runs in the caller, which blocks the loop for that long but is the
    only way to have its value there without awaiting. (A waiter there cannot hand deep
    recursion to another thread: it could not block.)
    """
    return inline.depth < max_inline_depth() or _loops.running_native_loop() is not None


def _reset_in_child() -> None:
    # A worker thread that forked holds a slot of the parent's pool, which the child lacks.
    _current.slot = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_in_child)
