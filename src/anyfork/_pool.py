"""The worker pool every sync fork runs on.

Its threads take part in managed blocking (``_blocking.py``): each runs its jobs holding
a slot (:class:`_PoolSlot`), which a blocking wait gives back while it waits, so nested
fork-and-wait never deadlocks at any ``worker_threads``; an untimed wait of a blocked worker
goes through :meth:`WorkerPool.wait_helping`.

anyfork's own hand-offs (settling a finished Dask fork, running the done callbacks of a
background-loop fork, which complete ``then``, ``collect_all`` and ``as_completed``) go
through :func:`submit`: they never queue behind sync forks, but run on an idle thread or
on one started for them above the limit, which retires after.

The locks here are reentrant and the job queue is a ``SimpleQueue``, whose ``put`` is
reentrant: a signal handler that forks while the interrupted code is inside the pool does
not deadlock.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable

from . import _loops
from ._blocking import Slot, run_in_slot
from ._config import current_config, on_configure

__all__ = [
    "WorkerPool",
    "hand_over",
    "hand_over_deferred",
    "is_deferred",
    "submit",
    "submit_fork",
    "worker_pool",
]

logger = logging.getLogger("anyfork")

# Python 3.12+ starts no new thread once the interpreter is exiting (the exit join included).
_NO_THREADS_AT_EXIT = sys.version_info >= (3, 12)
# How many idle threads the pool keeps for the exit join there (see ensure_a_thread).
_KEPT_AT_EXIT = 4


class WorkerPool:
    """The worker pool every sync fork runs on: daemon threads fed by one queue, at most
    ``worker_threads`` of them running jobs.

    Threads start on demand. Every queued item is promised to one thread, under the lock,
    when it is queued: to an idle thread, to a thread started for it, or (at the limit) to
    the backlog, which the next thread to come back for work takes over. A thread counts as
    idle only while nothing is promised to it, so a job is never left queued behind a
    thread that is about to run another one.

    A thread blocked in a wait does not count against the limit, so the pool may start one
    more in its place; when the blocked thread resumes, it finishes its job without waiting
    for a place (so resuming never deadlocks), and the extra threads retire after their job
    once the limit holds again.

    A thread that waits ``worker_idle_timeout`` seconds without a job retires if it is
    still idle, i.e. nothing was promised to it meanwhile; otherwise it takes the job
    promised to it. Once the background loop has asked for a thread at exit (see
    :meth:`ensure_a_thread`), the pool keeps one, or on Python 3.12+ a few.
    """

    def __init__(self) -> None:
        # None is a request to retire, sent when worker_threads is lowered.
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._limit = current_config().worker_threads
        self._lock = threading.RLock()
        self._threads = 0  # alive worker threads
        self._idle = 0  # threads waiting for work with nothing promised to them
        self._backlog = 0  # queued items promised to no thread yet
        self._blocked = 0  # worker threads blocked in a wait (their place given back)
        self._keep = 0  # threads that never retire for being idle
        # Set once a thread failed to start (Python 3.12+ at exit): blocked workers help.
        self._starved = False
        # anyfork's own hand-offs: every worker runs these before the next item it takes.
        # An item _HAND_OFF in the queue wakes an idle thread for them.
        self._hand_offs: deque[Callable[[], object]] = deque()

    @property
    def max_workers(self) -> int:
        """``worker_threads`` of :func:`anyfork.configure` (a new value applies at once)."""
        return self._limit

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; raises RuntimeError if a needed thread cannot start (it stays
        queued, in the backlog)."""
        self._jobs.put(job)
        self._promise_an_item()

    def hand_off(self, job: Callable[[], object]) -> None:
        """Run ``job``, anyfork's own short completion work, at once: on an idle thread, or
        on one started for it even at the limit (it retires after, unless it is needed);
        never behind queued sync forks. Raises RuntimeError if no thread is idle and none
        can start (a worker back from its job, or blocked in a wait, runs it then)."""
        self._hand_offs.append(job)
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(_HAND_OFF)
                return
            self._threads += 1
        try:
            self._start_thread(promised=False, hand_offs_first=True)
        except RuntimeError:
            # Queue a wake-up, so that a thread going idle meanwhile does not miss the job.
            self._jobs.put(_HAND_OFF)
            self._promise_an_item(may_start=False)
            raise

    def ensure_a_thread(self) -> None:
        """Start one thread now if there is none, so that work queued while the
        interpreter exits (when Python 3.12 starts no new thread) still has one.

        On Python 3.12+ the pool then keeps up to :data:`_KEPT_AT_EXIT` threads: a fork
        running at exit may block waiting for work that needs another thread, and none
        can start then. A blocked worker runs such work itself if it must (see
        :meth:`wait_helping`); the kept threads spare it that, and let timed waits (which
        run nothing inline) find a thread, without keeping every thread a burst started.
        """
        with self._lock:
            # The threads are needed then, however long they were idle before.
            self._keep = _KEPT_AT_EXIT if _NO_THREADS_AT_EXIT else 1
            if self._threads:
                return
            self._threads += 1
        self._start_thread(promised=False)

    def apply_new_limit(self) -> None:
        """Apply ``worker_threads`` now (configure() calls this): start threads for the
        backlog up to a raised limit, or ask threads above a lowered one to retire."""
        with self._lock:
            self._limit = current_config().worker_threads
            excess = self._threads - self._limit - self._blocked
            starts = 0
            while self._backlog and self._threads < self._limit + self._blocked:
                self._backlog -= 1
                self._threads += 1
                starts += 1
        for _ in range(starts):
            try:
                self._start_thread(promised=True)
            except RuntimeError:  # no new thread at interpreter exit: it stays in the backlog
                break
        # Idle threads take these before the jobs queued after them, and retire; busy
        # threads above the limit retire after their job.
        for _ in range(excess):
            self._jobs.put(None)
            self._promise_an_item()

    def _promise_an_item(self, *, may_start: bool = True) -> None:
        """Promise the item just queued to a thread: an idle one, a new one, or the backlog."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                return
            if not may_start or self._threads >= self._limit + self._blocked:
                self._backlog += 1
                return
            self._threads += 1
        self._start_thread(promised=True)

    def _start_thread(self, *, promised: bool, hand_offs_first: bool = False) -> None:
        with self._lock:
            number = self._threads
        thread = threading.Thread(
            target=self._work,
            args=(promised, hand_offs_first),
            name=f"anyfork-worker-{number}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._starved = True
                self._threads -= 1
                if promised:
                    self._backlog += 1  # the next thread back for work takes it
            raise

    def _work(self, promised: bool, hand_offs_first: bool) -> None:
        slot = _PoolSlot(self)
        if hand_offs_first:  # started for a hand-off, maybe above the limit
            self._run_hand_offs(slot)
            with self._lock:
                if self._threads > self._limit + self._blocked:
                    self._threads -= 1
                    return
        while True:
            if not promised:
                with self._lock:
                    if self._backlog:
                        self._backlog -= 1
                    else:
                        self._idle += 1
            promised = False
            try:
                job = self._next_job()
            except queue.Empty:
                with self._lock:
                    if self._idle and self._threads > self._keep:
                        self._idle -= 1  # still idle: nothing was promised to this thread
                        self._threads -= 1
                        return
                # An item was promised to an idle thread meanwhile (or this one is kept):
                # wait for it, without counting as idle a second time.
                promised = True
                continue
            if self._hand_offs:
                self._run_hand_offs(slot)
            if job is None or job is _HAND_OFF:
                with self._lock:
                    if job is None and self._threads > self._limit + self._blocked:
                        self._threads -= 1
                        return
                continue
            self._run(slot, job)
            del job
            if self._hand_offs:
                self._run_hand_offs(slot)
            with self._lock:
                if self._threads > self._limit + self._blocked:
                    self._threads -= 1  # a stand-in for a blocked thread: no longer needed
                    return

    def run_hand_offs_here(self) -> None:
        """Run the hand-offs no worker has taken yet, in this thread (not a worker's)."""
        self._run_hand_offs(None)

    def _run_hand_offs(self, slot: Slot | None) -> None:
        while True:
            try:
                job = self._hand_offs.popleft()
            except IndexError:
                return
            self._run(slot, job)
            del job

    @staticmethod
    def _run(slot: Slot | None, job: Callable[[], object]) -> None:
        try:
            if slot is None:
                job()
            else:
                run_in_slot(slot, job)
        except BaseException:
            # A job completes its future itself; what escapes is an interrupt raised by a
            # done callback it ran, which has no caller to reach in this thread.
            logger.exception("a worker thread's job raised")

    def _next_job(self) -> Callable[[], object] | None:
        """Wait for the next item; raises ``queue.Empty`` after ``worker_idle_timeout``.

        A timeout longer than a thread can wait (``threading.TIMEOUT_MAX``, ``inf``
        included) means "never retire", as long wait timeouts mean "no bound". Nothing
        here may end the thread's loop with its accounting half-done: if the timed wait
        fails anyway, the thread logs it and waits without a timeout.
        """
        idle_timeout = current_config().worker_idle_timeout
        if idle_timeout is None or idle_timeout > threading.TIMEOUT_MAX:
            return self._jobs.get()
        try:
            return self._jobs.get(timeout=idle_timeout)
        except queue.Empty:
            raise
        except Exception:  # pragma: no cover - a timeout the platform refuses
            logger.exception("a worker thread's timed wait for work failed")
            return self._jobs.get()

    def wait_helping(self, slot: Slot, event: threading.Event) -> bool:
        """Wait, without a timeout, for ``event``, in a worker thread blocked in a wait.

        Where no thread can start (Python 3.12+ while the interpreter exits), the stand-in
        this thread's place should go to never comes, and work queued behind it (the inner
        sync fork of a sync fork that waits for a coroutine fork, a finished Dask fork's
        settling) has nothing to run it. The blocked thread then runs that work itself, as
        its stand-in would have, so nested fork-and-wait cannot deadlock at exit either.
        On 3.12+ it looks for such work every :data:`_HELP_POLL` seconds (only waits that
        began before a thread failed to start need it), then every
        :data:`_HELP_POLL_STARVED`.
        """
        if not (self._starved or _NO_THREADS_AT_EXIT):
            return event.wait()
        while True:
            if self._starved:
                self._help(slot)
            if event.wait(_HELP_POLL_STARVED if self._starved else _HELP_POLL):
                return True

    def _help(self, slot: Slot) -> None:
        """Run queued items promised to no thread, in this blocked worker thread."""
        while True:
            if self._hand_offs:
                self._run_hand_offs(slot)
            with self._lock:
                if not self._backlog:
                    return
                self._backlog -= 1
            job = self._jobs.get()  # there is one: the backlog counts queued items
            if job is None or job is _HAND_OFF:
                continue  # a request to retire (this thread is needed), or a wake-up
            # The job holds this thread's place while it runs, as a stand-in's would.
            self.worker_resumed()
            try:
                self._run(slot, job)
            finally:
                del job
                with self._lock:
                    self._blocked += 1

    def worker_blocked(self) -> None:
        """A worker thread blocks in a wait: its place goes to a stand-in if work is waiting."""
        with self._lock:
            self._blocked += 1
            if not self._backlog or self._threads >= self._limit + self._blocked:
                return
            self._backlog -= 1
            self._threads += 1
        try:
            self._start_thread(promised=True)
        except RuntimeError:  # no new thread at interpreter exit: nothing to hand over to
            pass

    def worker_resumed(self) -> None:
        with self._lock:
            self._blocked -= 1


class _PoolSlot:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def release(self) -> None:
        self.pool.worker_blocked()

    def reacquire(self) -> None:
        self.pool.worker_resumed()

    def wait_untimed(self, event: threading.Event) -> bool:
        return self.pool.wait_helping(self, event)


# --- the one worker pool of the process -------------------------------------------------

_lock = threading.RLock()
_pool: WorkerPool | None = None
# Jobs made on a loop's thread, until that loop next gets control and hands them over.
# Used without the lock: each of its operations is one atomic dict operation.
_deferred: dict[Callable[[], object], None] = {}


def worker_pool() -> WorkerPool:
    """The process's worker pool, started on first use (again in a child made by os.fork)."""
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            # A signal handler that forked while this thread was here made one already.
            pool = _pool = _pool or WorkerPool()
    return pool


def _apply_new_config() -> None:
    pool = _pool
    if pool is not None and pool.max_workers != current_config().worker_threads:
        pool.apply_new_limit()


on_configure(_apply_new_config)


def submit(job: Callable[[], object]) -> None:
    """Hand ``job``, anyfork's own short completion work (settling a future, running the
    done callbacks of a background-loop fork), to the worker pool: it runs at once, ahead
    of queued sync forks (see :meth:`WorkerPool.hand_off`)."""
    try:
        worker_pool().hand_off(job)
    except RuntimeError:
        # No thread is idle and none can start (Python 3.12+ at exit): a worker runs it
        # when back from its job, or while blocked in a wait. In a plain thread, run it here.
        if _loops.running_native_loop() is None:
            worker_pool().run_hand_offs_here()


def submit_fork(job: Callable[[], object], native: object | None = None) -> None:
    """Run ``job``, a sync fork, on the worker pool.

    :param native: the loop running in this thread, if any: the job then reaches the pool
        when that loop next gets control, so that a blocking wait before that (a forward
        that forks and waits, called in async code) runs it in the caller, as
        ``torch.jit.wait`` does
    """
    pool = worker_pool()
    if native is None:
        _submit_now(pool, job)
        return
    _deferred[job] = None  # one dict operation: atomic, no lock needed
    _loops.call_soon_here(native, hand_over, job)


def is_deferred(job: Callable[[], object]) -> bool:
    """Whether ``job`` was made on a loop's thread that has not got control since (it has
    not reached the pool yet)."""
    return job in _deferred


def hand_over(job: Callable[[], object]) -> None:
    """Queue a job that :func:`submit` deferred to the loop's next turn, now (a task awaits
    its future: the loop gets control anyway); nothing if it was queued already."""
    if _deferred.pop(job, _MISSING) is _MISSING:  # atomic: one caller wins
        return  # queued already (by the loop's turn, an awaiting task or the exit join)
    if not getattr(job, "taken", False):  # not run inline by a waiter meanwhile
        _submit_now(worker_pool(), job)


def hand_over_deferred() -> None:
    """Queue the jobs made on loops that never got control again (closed right after)."""
    jobs = list(_deferred)
    for job in jobs:
        hand_over(job)


def _submit_now(pool: WorkerPool, job: Callable[[], object]) -> None:
    try:
        pool.submit(job)
    except RuntimeError:
        # Python 3.12 starts no new thread once the interpreter is exiting, and no worker
        # is idle. In a plain thread, run the job here and now, as eager mode would,
        # rather than leave it queued behind a bound nobody may wait out. On a loop's
        # thread it stays queued for the next free worker: it must not block the loop
        # (the background loop keeps one worker for this: see ensure_a_thread), unless
        # there is no worker at all (a loop in a non-daemon thread that forks after the
        # main thread returned): then nothing else could ever run it.
        if _loops.running_native_loop() is None or pool.threads == 0:
            job()  # if a worker took the queued copy first, this does nothing


def _reset_in_child() -> None:
    """A child made by ``os.fork`` has none of the parent's worker threads: it starts a
    fresh pool on first use, with none of the parent's jobs."""
    global _lock, _pool
    _lock = threading.RLock()
    _pool = None
    _deferred.clear()


_MISSING = object()
# How often a blocked worker thread on Python 3.12+ looks for work no thread can take, and
# how often once a thread failed to start (see WorkerPool.wait_helping).
_HELP_POLL = 0.25
_HELP_POLL_STARVED = 0.01
# An item of a worker pool's queue that wakes a thread for the hand-offs (see hand_off).
_HAND_OFF: Callable[[], object] = lambda: None  # noqa: E731

if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_in_child)
