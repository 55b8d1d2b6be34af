"""Forks made where no event loop runs: plain scripts and threads anyio did not start.

Sync callables go to a pool of worker threads; coroutine functions go to one background
event loop per process, served through anyio's ``BlockingPortal``. Both are set up lazily,
so a program that never forks outside a loop pays nothing.

At interpreter exit every unfinished fork is joined, so no work is lost, within a bound
(``Config.exit_timeout``). The join runs as a ``threading`` at-exit hook, which Python
calls *before* it joins non-daemon threads, so forks made by forks during the join still
run. Every thread anyfork starts here is a daemon thread: a job that never finishes cannot
hold the process past the bound, as it would in a ``ThreadPoolExecutor``, whose threads
Python joins at exit however long they take.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._config import current_config
from ._errors import ShutdownError
from ._future import Future
from ._scope import _AmbientGroup, ambient_group, exit_join_started

__all__ = ["fallback"]

logger = logging.getLogger("anyfork")

# After giving up on the forks at exit, how long to let cancelled tasks unwind.
_LOOP_STOP_GRACE = 5.0


class _WorkerPool:
    """Daemon worker threads fed by one queue, started on demand up to ``max_workers``."""

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; raises RuntimeError if a needed thread cannot start (it stays queued)."""
        self._jobs.put(job)
        if self._idle.acquire(blocking=False):
            return
        with self._lock:
            if self._threads >= self._max_workers:
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
        while True:
            job = self._jobs.get()
            try:
                job()  # a job completes its future itself and never raises
            except BaseException:  # pragma: no cover - defensive
                logger.exception("anyfork: a worker thread's job raised")
            del job
            self._idle.release()


def _start_background_loop() -> tuple[anyio.from_thread.BlockingPortal, threading.Thread]:
    """Run an asyncio loop in a daemon thread; return a portal into it, and the thread."""
    ready: concurrent.futures.Future[anyio.from_thread.BlockingPortal] = concurrent.futures.Future()

    async def serve() -> None:
        async with anyio.from_thread.BlockingPortal() as portal:
            ready.set_result(portal)
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve, backend="asyncio")
        except BaseException as exc:  # pragma: no cover - the loop failed to start
            if not ready.done():
                ready.set_exception(exc)
            else:
                logger.exception("anyfork: the background event loop failed")

    thread = threading.Thread(target=run, name="anyfork background loop", daemon=True)
    thread.start()
    return ready.result(), thread


class _Fallback:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: _WorkerPool | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_group: _AmbientGroup | None = None
        self._pending: set[Future[Any]] = set()
        self._exit_hook_registered = False
        self._shut_down = False

    def _check_open(self) -> None:
        if self._shut_down:
            raise ShutdownError(
                "anyfork cannot start new work: the interpreter is shutting down. Fork "
                "before the end of the script, or wait for the fork inside the work that "
                "makes it."
            )
        if not self._exit_hook_registered:
            # Runs before threads are joined at exit, unlike atexit.register.
            threading._register_atexit(self.join_at_exit)  # type: ignore[attr-defined]
            self._exit_hook_registered = True

    def submit_sync(self, future: Future[Any], job: Callable[[], None]) -> None:
        """Run ``job`` in the pool; the job completes ``future`` itself."""
        with self._lock:
            self._check_open()
            pool = self._pool
            if pool is None:
                pool = self._pool = _WorkerPool(current_config().worker_threads)
            self._pending.add(future)
        future.add_done_callback(self._discard)
        try:
            pool.submit(job)
        except RuntimeError:
            # Python 3.12+ refuses new threads once the interpreter is exiting. The job is
            # queued all the same: an idle worker, or the exit join stealing it, runs it.
            pass

    def _discard(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def loop_group(self) -> _AmbientGroup:
        """Return the ambient group of the background loop, starting the loop if needed."""
        with self._lock:
            self._check_open()
            if self._loop_group is None:
                portal, self._loop_thread = _start_background_loop()
                self._portal = portal
                token = portal.call(anyio.lowlevel.current_token)
                self._loop_group = ambient_group(token.native_token, token)
            return self._loop_group

    def adopt(self, future: Future[Any]) -> None:
        """Have the exit join wait for ``future`` too (sync work that outlived its loop)."""
        with self._lock:
            if self._shut_down:
                return
            self._check_open()
            self._pending.add(future)
        future.add_done_callback(self._discard)

    def _unfinished(self) -> list[Future[Any]]:
        with self._lock:
            unfinished = list(self._pending)
            if self._loop_group is not None:
                unfinished.extend(self._loop_group.pending_futures())
        return [future for future in unfinished if not future.done()]

    def join_at_exit(self) -> None:
        """Wait (within the exit bound) for every unfinished fork, then stop the loop."""
        bound = current_config().exit_timeout
        deadline = None if bound is None else time.monotonic() + bound
        try:
            # Inside the try: a Ctrl-C that lands right after this still ends the join.
            exit_join_started.set()
            while unfinished := self._unfinished():
                for future in unfinished:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    # Only wait: reading the outcome would hide a failure nobody retrieved.
                    future._block_until_done(None if remaining is None else max(remaining, 0))
        except TimeoutError:
            self._give_up(
                f"did not finish within the exit bound of {bound} seconds "
                "(anyfork.configure(exit_timeout=...), ANYFORK_EXIT_TIMEOUT)"
            )
        except KeyboardInterrupt:
            self._give_up("were interrupted at exit (Ctrl-C)")
        finally:
            with self._lock:
                self._shut_down = True
                portal, self._portal = self._portal, None
                thread, self._loop_thread = self._loop_thread, None
            if portal is not None and thread is not None:
                self._stop_loop(portal, thread)

    def _give_up(self, why: str) -> None:
        unfinished = self._unfinished()
        logger.error(
            "anyfork: %d fork(s) %s; cancelling those that can be, abandoning the rest: %s",
            len(unfinished),
            why,
            ", ".join(repr(future) for future in unfinished),
        )
        for future in unfinished:
            future.cancel()

    def _stop_loop(
        self, portal: anyio.from_thread.BlockingPortal, thread: threading.Thread
    ) -> None:
        # Cancel what is left and let it unwind, briefly: the loop's thread is a daemon, so
        # a task that refuses to end cannot hold the process.
        try:
            portal.start_task_soon(portal.stop, True)
            thread.join(_LOOP_STOP_GRACE)
        except RuntimeError:  # the portal is already closed
            return
        except KeyboardInterrupt:
            return
        if thread.is_alive():
            logger.error("anyfork: the background event loop did not stop; abandoning it")

    def run_callbacks_in_worker(
        self, future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]
    ) -> None:
        """Run the done callbacks of ``future``, completed on the background loop, in the
        worker pool: there they may block, wait and fork like any script code. The exit
        join waits for them. Callbacks that only wake a task awaiting ``future`` run at once.
        """
        from ._future import _FINISHED, _run_callbacks
        from ._loops import wakes_a_task

        for callback in [callback for callback in callbacks if wakes_a_task(callback)]:
            callbacks.remove(callback)
            callback(future)
        if not callbacks:
            return
        ran: Future[None] = Future(name=f"done callbacks of {future!r}")

        def run() -> None:
            if ran._start_running():
                try:
                    _run_callbacks(future, callbacks)
                finally:
                    ran._complete(_FINISHED, None, None)

        ran._steal = run  # the exit join runs them itself if no thread can start
        try:
            self.submit_sync(ran, run)
        except ShutdownError:  # the exit join is over: nothing left to hand them to
            run()


fallback = _Fallback()
