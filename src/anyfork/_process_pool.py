"""The pool of worker processes behind ``anyfork.process``: which worker runs which job.

A small layer of our own over ``subprocess`` and a socket per worker, chosen over
``ProcessPoolExecutor``, loky and ``anyio.to_process`` (see docs/using-every-core.md) for
three guarantees none of them gives together: cancelling a running fork kills its worker
process (and only it: a fresh one takes its place), a worker that dies fails only the fork
it was running, and forks work where no event loop runs.

Each worker process has one thread here that feeds it one job at a time: it takes a job from
the queue, sends it down the worker's socket and blocks until the reply comes back, or the
socket closes because the process died. Cancelling a running job (its future completing by
any other way than its reply: ``cancel()``, a scope, a deadline) kills the process; the
thread sees it die, reaps it, and starts a fresh one for its next job. Threads and processes
start lazily, up to ``process_workers``, and retire after ``worker_idle_timeout``.

Workers are fresh interpreters (spawn), never ``fork`` copies of this threaded process; they
all read one "lifeline" pipe whose other end only this process holds, so they end with it
even if it is killed. The exit join waits for process forks like any fork, then stops the
pool (:meth:`ProcessPool.stop`), within its share of the exit bound. One job and one
worker process (its socket and framing) are in ``_process_link``.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import threading
import time
from typing import Any, Literal

from ._config import current_config, on_configure
from ._errors import ProcessDiedError
from ._exit import exit_join
from ._future import Future
from ._process_link import DIRECT_SEND, Job, Worker
from ._state import attach, on_done, settle, settle_failed

__all__ = ["RemoteTraceback", "pool"]


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process, as text: the ``__cause__`` of
    that error here, as with ``ProcessPoolExecutor``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class ProcessPool:
    """The worker processes of this interpreter (one pool, shared by every loop and thread)."""

    def __init__(self) -> None:
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()  # while no worker is idle
        self._threads = 0  # feeding threads, each with at most one worker process
        self._idle: list[Worker] = []  # workers waiting for a job, the last idle last
        self._workers: set[Worker] = set()
        self._lifeline: tuple[int, int] | None = None  # (read end, write end)
        self._generation = 0  # stop() ends the threads and workers of earlier generations
        self._joins_exit = False

    # --- forking side -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Give ``job`` to an idle worker (a small one is written to it here and now), or
        queue it for the next worker free, starting one if there are fewer than
        ``process_workers``."""
        if not self._joins_exit:
            exit_join.add_participant(self)  # raises ShutdownError once the exit join is over
            self._joins_exit = True
        job.stop = self.stop_job
        attach(job.future, job)
        on_done(job.future, job.cancel)  # a deadline settles it: that stops the work too
        start = False
        with self._lock:
            # A worker that died while idle (its thread sees its socket close and retires
            # it) must not be given the job: that would fail a fork it never ran.
            while self._idle and self._idle[-1].process.poll() is not None:
                self._idle.pop()
            if self._idle:
                worker = self._idle.pop()
                self._give(worker, job)
                if len(job.request) <= DIRECT_SEND:
                    worker.unsent = False
                    request, job.request = job.request, b""
                    try:
                        worker.send(request)
                    except OSError:  # it died while idle: its thread sees it
                        pass
                else:
                    worker.wake()  # its thread sends it (a big write could block here)
            else:
                self._queue.append(job)
                start = self._threads < _most_workers()
                if start:
                    self._threads += 1
            generation = self._generation
        if start:
            self._start_thread(generation)

    @staticmethod
    def _give(worker: Worker, job: Job) -> None:
        # Under the lock.
        worker.job, worker.unsent = job, True
        job.worker, job.started = worker, True

    def _start_thread(self, generation: int) -> None:
        try:
            threading.Thread(
                target=self._feed, args=(generation,), name="anyfork process feeder", daemon=True
            ).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def stop_job(self, job: Job) -> None:
        """The future of ``job`` completed without its reply (cancelled, a deadline): kill
        its worker if the job was sent to it; a queued job is skipped when its turn comes."""
        with self._lock:
            worker = job.worker
            if worker is None or (worker.job is job and worker.unsent):
                return
            # Under the lock: the worker cannot have moved on to another job, and its
            # thread will not give it one (see _run).
            worker.killed = True
            worker.kill()

    # --- the feeding threads ------------------------------------------------------------

    def _feed(self, generation: int) -> None:
        """One worker's thread: start the worker, then send it jobs and complete their
        futures with its replies, one at a time, until it retires or dies (then start a
        fresh one if jobs are queued)."""
        worker: Worker | None = None
        try:
            while True:
                if worker is None:
                    with self._lock:
                        if not self._queue or generation != self._generation:
                            if generation == self._generation:
                                self._threads -= 1
                            return
                    try:
                        worker = self._start_worker(generation)
                    except Exception as exc:
                        self._fail_queued(exc)
                        continue
                    if worker is None:
                        return  # the pool was stopped meanwhile
                job = self._next_job(worker, generation)
                if job is None:
                    return
                if isinstance(job, str):  # _LOOK_AGAIN
                    with self._lock:  # died while idle, and given no job since: replace it
                        died = worker.job is None and worker.process.poll() is not None
                        if died:
                            self._workers.discard(worker)
                    if died:
                        worker.end(_GRACE)
                        worker = None
                    continue
                if not self._run(worker, job):
                    worker = None
        finally:
            if worker is not None:
                with self._lock:
                    self._workers.discard(worker)
                    if worker in self._idle:
                        self._idle.remove(worker)
                worker.end(_GRACE)

    def _start_worker(self, generation: int) -> Worker | None:
        """A new worker process; ``None`` if the pool was stopped meanwhile. The process
        starts outside the lock: forking threads (an event loop's) never wait for it."""
        with self._lock:
            if self._lifeline is None:
                self._lifeline = os.pipe()
            lifeline = self._lifeline[0]
        worker = Worker(lifeline)
        with self._lock:
            if generation == self._generation:
                self._workers.add(worker)
                return worker
        worker.kill()
        worker.end(_GRACE)
        return None

    def _fail_queued(self, exc: Exception) -> None:
        with self._lock:
            job = self._queue.popleft() if self._queue else None
        if job is not None:
            settle_failed(
                job.future, RuntimeError(f"anyfork could not start a worker process: {exc}")
            )

    def _next_job(self, worker: Worker, generation: int) -> Job | _LookAgain | None:
        """The job ``worker`` runs next; ``_LOOK_AGAIN`` after waiting idle (woken, or the
        worker died); ``None`` when this thread ends (idle for ``worker_idle_timeout``, more
        threads than ``process_workers``, the pool stopped), uncounted."""
        with self._lock:
            if worker.job is None:
                while self._queue:
                    job = self._queue.popleft()
                    if not job.future.done():  # a cancelled queued fork never starts
                        self._give(worker, job)
                        return job
                if generation != self._generation:
                    return None  # stop() counted this thread out already
                if self._threads > _most_workers():
                    self._threads -= 1
                    return None
                self._idle.append(worker)
            else:
                return worker.job
        woken = worker.wait_idle(_idle_timeout())
        with self._lock:
            if worker.job is not None:
                return _LOOK_AGAIN  # given a job meanwhile
            if worker in self._idle:  # (submit() drops a dead worker from the list)
                self._idle.remove(worker)
            if woken or self._queue or worker.process.poll() is not None:
                return _LOOK_AGAIN  # to retire, stop, take a job, or replace a dead worker
            # Idle for the whole timeout.
            if generation == self._generation:
                self._threads -= 1
            return None

    def _run(self, worker: Worker, job: Job) -> bool:
        """Run ``job`` on ``worker``; ``False`` if the worker died (it has been reaped)."""
        with self._lock:
            unsent, worker.unsent = worker.unsent, False
            if unsent and job.future.done():  # cancelled before it was sent
                worker.job = job.worker = None
                return True
        reply: bytearray | None = None
        try:
            if unsent:
                request, job.request = job.request, b""
                worker.send(request)
                del request
            reply = worker.receive()
        except (EOFError, OSError):
            pass
        with self._lock:
            worker.job = job.worker = None
            if worker.killed:  # its job was cancelled as its reply came: not for the next
                reply = None
        if reply is None:
            with self._lock:
                self._workers.discard(worker)
            code = worker.end(_GRACE)
            if not job.future.done():
                settle_failed(job.future, _died(job.name, code))
            return False
        _settle(job, reply)
        return True

    # --- configuration, exit, os.fork ---------------------------------------------------

    def adjust(self) -> None:
        """Apply a new ``process_workers``: idle threads above it retire, queued jobs get
        new ones."""
        with self._lock:
            for worker in self._idle:
                worker.wake()
            missing = max(min(len(self._queue), _most_workers() - self._threads), 0)
            self._threads += missing
            generation = self._generation
        for _ in range(missing):
            self._start_thread(generation)

    def worker_pids(self) -> list[int]:
        """The process ids of the worker processes alive now."""
        with self._lock:
            return [worker.pid for worker in self._workers]

    def pending_futures(self) -> list[Future[Any]]:
        return []  # each process fork is tracked by the exit join itself (_remote)

    def stop(self, timeout: float | None) -> None:
        """End every worker process within ``timeout`` seconds (killing those still
        running then), and the threads feeding them. Jobs still queued are cancelled. The
        pool starts again on the next process fork (exit participant; tests)."""
        with self._lock:
            workers = list(self._workers)
            queued = list(self._queue)
            self._queue.clear()
            lifeline, self._lifeline = self._lifeline, None
            self._generation += 1
            self._threads = 0
            self._joins_exit = False
            for worker in self._idle:
                worker.wake()
        for job in queued:
            job.future.cancel()
        if lifeline is not None:
            os.close(lifeline[1])  # every worker exits at once, even one running a fork
            os.close(lifeline[0])
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in workers:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            worker.end(remaining)
        with self._lock:
            self._workers.difference_update(workers)

    def reset_in_child(self) -> None:
        """In a child made by ``os.fork``: the workers are the parent's. Let go of this
        copy of their sockets and of the lifeline, and start afresh."""
        for worker in self._workers:
            worker.sock.close()
            for fd in (worker.wake_r, worker.wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
        self._setup()


# What ProcessPool._next_job returns after an idle wait: look at the worker's state again.
_LookAgain = Literal["look again"]
_LOOK_AGAIN: _LookAgain = "look again"

# Seconds a worker that lost its job (or its socket) gets to exit before it is killed.
_GRACE = 5.0


def _most_workers() -> int:
    return current_config().process_workers or os.cpu_count() or 1


def _idle_timeout() -> float | None:
    timeout = current_config().worker_idle_timeout
    return None if timeout is None or timeout > threading.TIMEOUT_MAX else timeout


def _settle(job: Job, reply: bytes | bytearray) -> None:
    try:
        kind, *outcome = pickle.loads(reply)
    except BaseException as exc:
        unloadable = TypeError(
            f"the outcome of {job.name} came back from its worker process but cannot be "
            f"loaded here: {exc!r}"
        )
        settle_failed(job.future, unloadable)
        return
    if kind == "value":
        settle(job.future, outcome[0])
        return
    error: BaseException
    if kind == "error":
        error, text = outcome
    else:  # the exception did not pickle: its type and message, as text
        message, text = outcome
        error = RuntimeError(
            f"{job.name} raised {message} in its worker process (that exception cannot be "
            "pickled, so it is reported as this RuntimeError)"
        )
    error.__cause__ = RemoteTraceback(text)
    settle_failed(job.future, error)


def _died(name: str, code: int) -> ProcessDiedError:
    if code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
        how = f"was killed by {signame} ({-code})"
        if -code == signal.SIGKILL:
            how += ": by hand, or by the out-of-memory killer"
    else:
        how = f"exited with code {code}"
    return ProcessDiedError(
        f"the worker process running {name} {how} before the fork finished. Only this fork "
        "fails: a fresh worker process takes its place",
        code,
    )


pool = ProcessPool()
on_configure(pool.adjust)

if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=pool.reset_in_child)
