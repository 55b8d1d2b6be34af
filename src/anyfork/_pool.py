"""The worker pool of the script fallback, and managed blocking for every worker thread.

Managed blocking is what keeps nested fork-and-wait from deadlocking at any
``worker_threads``: a worker thread that blocks in a wait gives its slot back for as long
as it waits (as fork-join pools and Dask's ``secede``/``rejoin`` do), so the work it waits
for, or the work that work waits for, always finds a slot. A worker thread registers its
slot with :func:`run_in_slot`; every blocking wait goes through :func:`secede` and
:func:`rejoin`.

The locks here are reentrant and the job queue is a ``SimpleQueue``, whose ``put`` is
reentrant: a signal handler that forks while the interrupted code is inside the pool does
not deadlock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.from_thread
from anyio.lowlevel import EventLoopToken

from . import _loops

__all__ = ["LimiterSlot", "Slot", "WorkerPool", "rejoin", "run_in_slot", "secede"]

logger = logging.getLogger("anyfork")


class Slot(Protocol):
    """One unit of a bounded pool's capacity, held by the thread running a job."""

    def release(self) -> None:
        """Give the capacity back while the holder blocks (it runs no job meanwhile)."""

    def reacquire(self) -> None:
        """Take capacity again once the wait is over; may block until there is some."""


class _CurrentSlot(threading.local):
    slot: Slot | None = None


_current = _CurrentSlot()


def run_in_slot(slot: Slot, job: Callable[[], object]) -> None:
    """Run ``job`` in this thread, holding ``slot``: its blocking waits release it."""
    outer = _current.slot
    _current.slot = slot
    try:
        job()
    finally:
        _current.slot = outer


def secede() -> Slot | None:
    """Before a blocking wait: a worker thread gives its slot back; returns it, else None.

    Pair every call with :func:`rejoin` in a ``finally``.
    """
    slot = _current.slot
    if slot is not None:
        _current.slot = None  # a nested wait inside this one (a signal handler's) holds none
        slot.release()
    return slot


def rejoin(slot: Slot | None) -> None:
    """After the wait: take the slot given back by :func:`secede` again."""
    if slot is not None:
        _current.slot = slot
        slot.reacquire()


class WorkerPool:
    """Daemon worker threads fed by one queue, at most ``max_workers`` running jobs.

    Threads start on demand. A thread blocked in a wait does not count against the limit,
    so the pool may start one more in its place; the extra threads retire once the limit
    holds again.
    """

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._lock = threading.RLock()
        self._threads = 0  # alive worker threads
        self._idle = 0  # threads waiting for a job that no submitter has claimed yet
        self._blocked = 0  # worker threads blocked in a wait (their slot given back)

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; raises RuntimeError if a needed thread cannot start (it stays queued)."""
        self._jobs.put(job)
        with self._lock:
            if self._idle:
                self._idle -= 1  # that thread will take this job
                return
        self._start_thread_if_allowed()

    def _start_thread_if_allowed(self) -> None:
        with self._lock:
            if self._threads >= self.max_workers + self._blocked:
                return
            self._threads += 1
            number = self._threads
        thread = threading.Thread(target=self._work, name=f"anyfork-worker-{number}", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads -= 1
            raise

    def _work(self) -> None:
        slot = _PoolSlot(self)
        while True:
            job = self._jobs.get()
            try:
                run_in_slot(slot, job)  # a job completes its future itself and never raises
            except BaseException:  # pragma: no cover - defensive
                logger.exception("anyfork: a worker thread's job raised")
            del job
            with self._lock:
                if self._threads > self.max_workers + self._blocked:
                    self._threads -= 1  # a stand-in for a blocked thread: no longer needed
                    return
                self._idle += 1

    def _secede(self) -> None:
        with self._lock:
            self._blocked += 1
        if not self._jobs.empty():
            try:
                self._start_thread_if_allowed()
            except RuntimeError:  # no new thread at interpreter exit: nothing to hand over
                pass

    def _rejoin(self) -> None:
        with self._lock:
            self._blocked -= 1


class _PoolSlot:
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def release(self) -> None:
        self._pool._secede()

    def reacquire(self) -> None:
        self._pool._rejoin()


class LimiterSlot:
    """A slot of an event loop's ``CapacityLimiter``, held by a sync fork in an anyio worker
    thread on behalf of ``borrower``; released and taken back through the loop."""

    def __init__(self, token: EventLoopToken, limiter: anyio.CapacityLimiter, borrower: object):
        self._token = token
        self._limiter = limiter
        self._borrower = borrower
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            _loops.call_soon(self._token, self._release_on_loop)

    def _release_on_loop(self) -> None:
        self._limiter.release_on_behalf_of(self._borrower)

    def reacquire(self) -> None:
        try:
            anyio.from_thread.run(
                self._limiter.acquire_on_behalf_of, self._borrower, token=self._token
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            # The loop is gone or shutting down (trio cancels the call then): nothing is
            # left to bound.
            return
        self.held = True
