"""Forks made where no event loop runs: plain scripts and threads anyio did not start.

Sync callables go to a pool of worker threads; coroutine functions go to one background
event loop per process (the background loop). Both are set up lazily, so a program that
never forks outside a loop pays nothing. A process made by ``os.fork`` starts with neither:
the child gets fresh ones on first use and never runs its parent's forks.

At interpreter exit every unfinished fork is joined, so no work is lost, within a bound
(``Config.exit_timeout``). The join runs as a ``threading`` at-exit hook, which Python
calls *before* it joins non-daemon threads, so forks made by forks during the join still
run. Every thread anyfork starts here is a daemon thread: a job that never finishes cannot
hold the process past the bound, as it would in a ``ThreadPoolExecutor``, whose threads
Python joins at exit however long they take.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio

from . import _loops
from ._config import current_config
from ._errors import ShutdownError
from ._future import Future, run_inline
from ._pool import WorkerPool
from ._scope import (
    _AmbientGroup,
    ambient_group,
    exit_join_started,
    forget_ambient_groups_in_child,
)

__all__ = ["fallback"]

logger = logging.getLogger("anyfork")

# How long the background loop gets to stop at exit, once its forks have finished or been
# given up on and cancelled. A loop stuck in a blocking call is abandoned after this (its
# thread is a daemon), so the process exits within the exit bound plus this grace.
_LOOP_STOP_GRACE = 0.5


def _new_asyncio_loop() -> asyncio.AbstractEventLoop:
    """Build asyncio's default loop class without going through the event loop policy.

    The first ``asyncio.new_event_loop()`` in a process sets the policy up under a plain
    (non-reentrant) lock. A signal handler that forks a coroutine while the interrupted code
    holds that lock would wait for it forever, in the thread that holds it.
    """
    if sys.platform == "win32":  # pragma: no cover - CI runs on Linux
        return asyncio.ProactorEventLoop()
    return asyncio.SelectorEventLoop()


class _BackgroundLoop:
    """An asyncio loop for a daemon thread, running from :meth:`start` until :meth:`stop`.

    The loop, its token and its ambient group exist before the thread starts, and nothing
    here waits for the thread: forks posted meanwhile queue on the loop. So a signal
    handler that forks while the interrupted code is starting the loop never waits for
    that code (which cannot run until the handler returns).
    """

    def __init__(self) -> None:
        self._loop = _new_asyncio_loop()
        self.token = _loops.token_for(self._loop)
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        self.thread = threading.Thread(
            target=self._run, name="anyfork background loop", daemon=True
        )

    def _run(self) -> None:
        async def serve() -> None:
            await self._stopped

        try:
            anyio.run(serve, backend="asyncio", backend_options={"loop_factory": self._take_loop})
        except BaseException:  # pragma: no cover - the loop itself failed
            logger.exception("anyfork: the background event loop failed")

    def _take_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _set_stopped(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    def discard(self) -> None:
        """Close a loop whose thread was never started."""
        self._loop.close()

    def stop(self, grace: float) -> None:
        """Ask the loop to stop without waiting on it, then give it ``grace`` seconds.

        Nothing here waits for the loop to answer: a coroutine fork stuck in a blocking call
        freezes the loop, and the exit bound must hold all the same.
        """
        if _loops.call_soon(self.token, self._set_stopped):
            self.thread.join(grace)
        if self.thread.is_alive():
            logger.error(
                "anyfork: the background event loop did not stop within %s seconds (a "
                "coroutine fork is blocking it); abandoning it",
                grace,
            )


class _Fallback:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pool: WorkerPool | None = None
        self._loop: _BackgroundLoop | None = None
        self._loop_group: _AmbientGroup | None = None
        # Insertion-ordered (a dict used as a set): the exit join goes through forks in order.
        self._pending: dict[Future[Any], None] = {}
        # Sync forks made on a loop's thread, until that loop hands them to the pool.
        self._deferred: dict[Future[Any], Callable[[], None]] = {}
        self._exit_hook_registered = False
        self._shut_down = False

    def _check_open(self) -> None:
        if self._shut_down:
            raise ShutdownError(
                "anyfork cannot start new work: the interpreter is shutting down and "
                "anyfork's exit join has ended. Fork before the end of the script, or wait "
                "for the fork inside the work that makes it."
            )
        if not self._exit_hook_registered:
            # Runs before threads are joined at exit, unlike atexit.register.
            try:
                threading._register_atexit(self.join_at_exit)  # type: ignore[attr-defined]
            except RuntimeError:
                raise ShutdownError(
                    "anyfork cannot start new work: the interpreter is already shutting "
                    "down (forking from an atexit handler or a finalizer), so nothing would "
                    "wait for it to finish. Fork before the end of the script, or call the "
                    "function directly."
                ) from None
            self._exit_hook_registered = True

    def submit_sync(
        self, future: Future[Any], job: Callable[[], None], native: object | None = None
    ) -> None:
        """Run ``job`` in the worker pool; the job completes ``future`` itself.

        :param native: the loop running in this thread, if any: the job then reaches the
            pool when that loop next gets control (a blocking wait before that runs it
            inline, in the caller)
        """
        with self._lock:
            self._check_open()
            pool = self._worker_pool()
            self._pending[future] = None
            if native is not None:
                self._deferred[future] = job
        future.add_done_callback(self._discard)
        if native is not None:
            _loops.call_soon_here(native, partial(self._submit_deferred, future))
            return
        self._submit(pool, job)

    def _submit_deferred(self, future: Future[Any]) -> None:
        with self._lock:
            job = self._deferred.pop(future, None)
            pool = self._pool
        if job is not None and pool is not None and not future.done() and not future._running:
            self._submit(pool, job)

    def _submit(self, pool: WorkerPool, job: Callable[[], None]) -> None:
        try:
            pool.submit(job)
        except RuntimeError:
            # Python 3.12 starts no new thread once the interpreter is exiting, and no worker
            # is idle. In a plain thread, run the job here and now, as eager mode would,
            # rather than leave it queued behind a bound nobody may wait out. On a loop's
            # thread it stays queued for the next free worker: it must not block the loop
            # (the background loop keeps one worker for this; see loop_group).
            if _loops.running_native_loop() is None:
                job()  # if a worker took the queued copy first, this does nothing

    def _submit_all_deferred(self) -> None:
        """Send the pool the jobs of sync forks made on a loop that never got control again
        (closed right after them): at exit they run like any other."""
        with self._lock:
            deferred = list(self._deferred)
        for future in deferred:
            self._submit_deferred(future)

    def _worker_pool(self) -> WorkerPool:
        pool = self._pool
        if pool is None:
            pool = WorkerPool()
            # A signal handler that forked while this thread was here made one already.
            pool = self._pool = self._pool or pool
        return pool

    def _discard(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.pop(future, None)
            self._deferred.pop(future, None)

    def loop_group(self) -> _AmbientGroup | None:
        """Return the ambient group of the background loop, starting the loop if needed.

        ``None`` means no thread can start for it (Python 3.12 at interpreter exit): the
        caller then runs the coroutine itself.
        """
        with self._lock:
            self._check_open()
            group = self._loop_group
            if group is not None:
                return group
            loop = _BackgroundLoop()
            if self._loop_group is not None:  # a signal handler set one up meanwhile
                loop.discard()
                return self._loop_group
            group = ambient_group(loop.token.native_token, loop.token)
            # User callbacks never run on the background loop: they go to the worker pool.
            group.callback_runner = self.run_callbacks_in_worker
            self._loop, self._loop_group = loop, group
            try:
                loop.thread.start()
            except RuntimeError:
                self._loop = self._loop_group = None
                for future in group.pending_futures():  # forked by a signal handler just now
                    future.cancel()
                loop.discard()
                return None
            try:
                # Done callbacks and sync forks of the background loop's coroutines go to
                # the worker pool, never run on the loop: keep a worker for them even while
                # the interpreter exits, when Python 3.12 starts no new thread.
                self._worker_pool().ensure_a_thread()
            except RuntimeError:
                pass  # already exiting: a worker that frees up takes them
            return group

    def adopt(self, future: Future[Any]) -> None:
        """Have the exit join wait for ``future`` too (sync work that outlived its loop)."""
        with self._lock:
            if self._shut_down:
                return
            self._check_open()
            self._pending[future] = None
        future.add_done_callback(self._discard)

    def _unfinished(self) -> list[Future[Any]]:
        with self._lock:
            unfinished = list(self._pending)
            if self._loop_group is not None:
                unfinished.extend(self._loop_group.pending_futures())
        return [future for future in unfinished if not future.done()]

    def join_at_exit(self) -> None:
        """Wait (within the exit bound) for every unfinished fork, then stop the loop.

        With a bound, the join only waits: it runs no fork inline, since a fork run inline
        cannot be stopped at the bound. Without one, it runs queued sync forks itself.
        """
        bound = current_config().exit_timeout
        deadline = None if bound is None else time.monotonic() + bound
        try:
            # Inside the try: a Ctrl-C that lands right after this still ends the join.
            exit_join_started.set()
            self._submit_all_deferred()
            if deadline is None:
                # Without a bound, help first: run the sync forks no worker has started yet,
                # from the last one back, as wait_all does.
                for future in reversed(self._unfinished()):
                    steal = future._steal
                    if steal is not None:
                        run_inline(steal)
                    del steal
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
        except SystemExit:
            self._give_up("were interrupted at exit (SystemExit raised by a fork the join ran)")
        finally:
            with self._lock:
                self._shut_down = True
                loop, self._loop = self._loop, None
            if loop is not None:
                try:
                    loop.stop(_LOOP_STOP_GRACE)
                except KeyboardInterrupt:
                    pass

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

    def reset_in_child(self) -> None:
        """Start a child made by ``os.fork`` with nothing of its parent's.

        The child has only the thread that forked: the parent's worker threads and
        background loop are not there, and the parent still runs its own forks. So the
        child forgets them (their futures, if the child holds any, read as cancelled) and
        starts a fresh pool and loop on first use.
        """
        inherited = list(self._pending)
        inherited.extend(forget_ambient_groups_in_child())  # the background loop's too
        self._lock = threading.RLock()
        self._pool = None
        self._loop = None
        self._loop_group = None
        self._pending = {}
        self._deferred = {}
        for future in inherited:
            future._abandon_in_child()

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

if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=fallback.reset_in_child)
