"""The pool of worker processes behind ``anyfork.process``, and the job of one process fork.

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
pool (:meth:`ProcessPool.stop`), within its share of the exit bound.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ._config import current_config, on_configure
from ._errors import ProcessDiedError
from ._exit import exit_join
from ._future import Future, Work, attach, on_done, settle, settle_failed

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = ["Job", "RemoteTraceback", "pool"]


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process, as text: the ``__cause__`` of
    that error here, as with ``ProcessPoolExecutor``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class Job(Work):
    """One process fork: its pickled call, and the worker running it while it runs."""

    __slots__ = ("future", "name", "request", "started", "worker")

    kind = "process"

    def __init__(self, future: Future[Any], name: str, request: bytes) -> None:
        self.future = future
        self.name = name
        self.request = request
        self.started = False
        self.worker: _Worker | None = None  # set while its worker runs it

    def state(self, future: Future[Any]) -> str:
        return "running" if self.started else "queued"

    def cancel(self, future: Future[Any]) -> None:
        """Its future was cancelled, or settled otherwise (a deadline): stop the work."""
        pool.stop_job(self)


# How a worker process starts: its sys.path is the parent's, set before anything is imported.
_WORKER_MAIN = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[3]); "
    "from anyfork._process_worker import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"
)


class _Worker:
    """One worker process and this side of its socket."""

    def __init__(self, lifeline: int) -> None:
        here, there = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_MAIN,
                    str(there.fileno()),
                    str(lifeline),
                    json.dumps(sys.path),
                ],
                pass_fds=(there.fileno(), lifeline),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
        from multiprocessing.connection import Connection  # not imported with anyfork

        self.conn: Connection = Connection(here.detach())

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:  # already gone
            pass

    def end(self, timeout: float | None) -> int:
        """Close the socket (an idle worker then exits), wait up to ``timeout`` seconds for
        the process to end, kill it if it has not; return its exit code."""
        self.conn.close()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()


class ProcessPool:
    """The worker processes of this interpreter (one pool, shared by every loop and thread)."""

    def __init__(self) -> None:
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._threads = 0  # feeding threads, each with at most one worker process
        self._idle = 0  # of which waiting for a job
        self._workers: set[_Worker] = set()
        self._lifeline: tuple[int, int] | None = None  # (read end, write end)
        self._generation = 0  # stop() ends the threads and workers of earlier generations
        self._joins_exit = False

    # --- forking side -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; a worker runs it as soon as one is free."""
        if not self._joins_exit:
            exit_join.add_participant(self)  # raises ShutdownError once the exit join is over
            self._joins_exit = True
        attach(job.future, job)
        on_done(job.future, job.cancel)  # a deadline settles it: that stops the work too
        with self._lock:
            self._queue.append(job)
            if self._idle:
                self._ready.notify()
            start = len(self._queue) > self._idle and self._threads < _most_workers()
            if start:
                self._threads += 1
            generation = self._generation
        if start:
            self._start_thread(generation)

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
        its worker if it is running it; a queued job is skipped when its turn comes."""
        with self._lock:
            worker = job.worker
        if worker is not None:
            worker.kill()

    # --- the feeding threads ------------------------------------------------------------

    def _feed(self, generation: int) -> None:
        worker: _Worker | None = None
        try:
            while (job := self._next_job(generation)) is not None:
                if worker is None:
                    try:
                        worker = self._start_worker()
                    except Exception as exc:
                        settle_failed(
                            job.future,
                            RuntimeError(f"anyfork could not start a worker process: {exc}"),
                        )
                        continue
                if not self._run(worker, job):
                    self._forget(worker)
                    worker = None
        finally:
            if worker is not None:
                worker.end(_GRACE)
                self._forget(worker)

    def _start_worker(self) -> _Worker:
        with self._lock:
            if self._lifeline is None:
                self._lifeline = os.pipe()
            worker = _Worker(self._lifeline[0])
            self._workers.add(worker)
        return worker

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)

    def _next_job(self, generation: int) -> Job | None:
        """The next job to run, or ``None`` when this thread should end (it has been idle
        for ``worker_idle_timeout``, there are more threads than ``process_workers``, or the
        pool was stopped); this thread is then no longer counted."""
        with self._lock:
            while True:
                if generation != self._generation:
                    return None  # stop() counted this thread out already
                if self._threads > _most_workers():
                    self._threads -= 1
                    return None
                while self._queue:
                    job = self._queue.popleft()
                    if not job.future.done():  # a cancelled queued fork never starts
                        job.started = True
                        return job
                self._idle += 1
                try:
                    woken = self._ready.wait(_idle_timeout())
                finally:
                    self._idle -= 1
                if not woken and not self._queue and generation == self._generation:
                    self._threads -= 1
                    return None

    def _run(self, worker: _Worker, job: Job) -> bool:
        """Run ``job`` on ``worker``; ``False`` if the worker died (it has been reaped)."""
        with self._lock:
            if job.future.done():
                return True
            job.worker = worker
        request, job.request = job.request, b""
        try:
            worker.conn.send_bytes(request)
            del request
            reply: bytes | None = worker.conn.recv_bytes()
        except (EOFError, OSError):
            reply = None
        with self._lock:
            job.worker = None
        if reply is None:
            code = worker.end(_GRACE)
            if not job.future.done():
                settle_failed(job.future, _died(job.name, code))
            return False
        _settle(job, reply)
        return True

    # --- configuration, exit, os.fork ---------------------------------------------------

    def adjust(self) -> None:
        """Apply a new ``process_workers``: threads above it retire, queued jobs get new ones."""
        with self._lock:
            self._ready.notify_all()
            missing = min(len(self._queue) - self._idle, _most_workers() - self._threads)
            missing = max(missing, 0)
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
            self._ready.notify_all()
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
            worker.conn.close()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
        self._setup()


# Seconds a worker that lost its job (or its socket) gets to exit before it is killed.
_GRACE = 5.0


def _most_workers() -> int:
    return current_config().process_workers or os.cpu_count() or 1


def _idle_timeout() -> float | None:
    timeout = current_config().worker_idle_timeout
    return None if timeout is None or timeout > threading.TIMEOUT_MAX else timeout


def _settle(job: Job, reply: bytes) -> None:
    try:
        kind, *outcome = pickle.loads(reply)
    except BaseException as exc:
        error = TypeError(
            f"the outcome of {job.name} came back from its worker process but cannot be "
            f"loaded here: {exc!r}"
        )
        settle_failed(job.future, error)
        return
    if kind == "value":
        settle(job.future, outcome[0])
        return
    if kind == "error":
        exc, text = outcome
    else:  # the exception did not pickle: its type and message, as text
        message, text = outcome
        exc = RuntimeError(
            f"{job.name} raised {message} in its worker process (that exception cannot be "
            "pickled, so it is reported as this RuntimeError)"
        )
    exc.__cause__ = RemoteTraceback(text)
    settle_failed(job.future, exc)


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
