"""The background loop: one event loop thread per process for coroutine forks made where no
loop runs (plain scripts, threads anyio did not start).

It starts on first use, so a program that never forks a coroutine outside a loop pays
nothing, and a process made by ``os.fork`` starts without it (the child gets a fresh one on
first use and never runs its parent's forks). Its forks are joined at interpreter exit by
the exit join (``_exit.py``), which then stops it. Its thread is a daemon thread: a fork
stuck in a blocking call cannot hold the process past the exit bound.

User callbacks never run on this hidden loop: the done callbacks of futures completed on it
run on the worker pool, where they may block, wait and fork like any script code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from contextvars import Context, copy_context
from typing import Any

import anyio

from . import _loops, _pool
from ._ambient import AmbientGroup, ambient_group
from ._callbacks import run_callbacks
from ._errors import ShutdownError
from ._exit import exit_join
from ._future import Future
from ._groups import Args, Kwargs
from ._loops import wakes_a_task
from ._state import Work, attach, claim, settle

__all__ = ["background"]

logger = logging.getLogger("anyfork")

# How long the background loop gets to stop when there is no exit bound to take a share
# of (close at the end of a process with exit_timeout=None, where its forks have all
# finished). A loop stuck in a blocking call is abandoned after its time (its thread is a
# daemon).
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
            logger.exception("the background event loop failed")

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
                "the background event loop did not stop within %s seconds (a "
                "coroutine fork is blocking it); abandoning it",
                grace,
            )


class _Background:
    """The background loop and its ambient group, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loop: _BackgroundLoop | None = None
        self._group: AmbientGroup | None = None
        # While a thread starts the loop: that thread, and the forks that signal handlers
        # running on top of it made meanwhile (see loop_group).
        self._starting: int | None = None
        self._held: _HeldForks | None = None

    def loop_group(self) -> AmbientGroup | _HeldForks | None:
        """Return the ambient group of the background loop, starting the loop if needed.

        A signal handler that forks while the thread it interrupted is starting the loop
        (building the loop takes longer than a fast timer's period, say) gets the forks'
        holder instead: its forks are handed to the loop once that start completes, when
        the handler has returned. It never starts a loop of its own, and never waits for
        the start, which cannot go on until the handler returns.

        ``None`` means no thread can start for it (Python 3.12 at interpreter exit): the
        caller then runs the coroutine itself.

        :raises ShutdownError: if the exit join is over
        """
        with self._lock:
            exit_join.check_open()
            group = self._group
            if group is not None:
                return group
            if self._starting == threading.get_ident():  # re-entered by a signal handler
                if self._held is None:
                    self._held = _HeldForks()
                return self._held
            self._starting = threading.get_ident()
            group = None
            try:
                group = self._start()
                return group
            finally:
                self._starting = None
                held, self._held = self._held, None
                if held is not None:
                    held.hand_to(group)

    def _start(self) -> AmbientGroup | None:
        loop = _BackgroundLoop()
        group = ambient_group(loop.token.native_token, loop.token)
        # User callbacks never run on the background loop: they go to the worker pool.
        group.callback_runner = self.run_callbacks_in_worker
        self._loop, self._group = loop, group
        try:
            loop.thread.start()
        except RuntimeError:
            self._loop = self._group = None
            for future in group.pending_futures():  # forked by a signal handler just now
                future.cancel()
            loop.discard()
            return None
        exit_join.add_participant(self)
        try:
            # Done callbacks and sync forks of the background loop's coroutines go to
            # the worker pool, never run on the loop: keep a worker for them even while
            # the interpreter exits, when Python 3.12 starts no new thread.
            _pool.worker_pool().ensure_a_thread()
        except RuntimeError:
            pass  # already exiting: a worker that frees up takes them
        return group

    # --- as a participant of the exit join ----------------------------------------------

    def pending_futures(self) -> list[Future[Any]]:
        group = self._group
        return [] if group is None else group.pending_futures()

    def stop(self, timeout: float | None) -> None:
        """Stop the loop within ``timeout`` seconds, its share of the exit bound."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop(_LOOP_STOP_GRACE if timeout is None else timeout)

    # --- done callbacks -------------------------------------------------------------------

    def run_callbacks_in_worker(
        self, future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]
    ) -> None:
        """Run the done callbacks of ``future``, completed on the background loop, on the
        worker pool: there they may block, wait and fork like any script code. The exit
        join waits for them. Callbacks that only wake a task awaiting ``future`` run at once.
        """
        for callback in [callback for callback in callbacks if wakes_a_task(callback)]:
            callbacks.remove(callback)
            callback(future)
        if not callbacks:
            return
        ran: Future[None] = Future(name=f"done callbacks of {future!r}")
        job = _CallbacksJob(ran, future, callbacks)
        attach(ran, job)  # the exit join runs them itself if no thread can start
        try:
            exit_join.track(ran)
        except ShutdownError:  # the exit join is over: nothing left to hand them to
            job()
            return
        _pool.submit(job)

    def reset_in_child(self) -> None:
        """The child has no background loop thread: it starts a fresh loop on first use
        (the loop's pending forks are abandoned with its ambient group, in ``_ambient``)."""
        self._lock = threading.RLock()
        self._loop = None
        self._group = None
        self._starting = None
        self._held = None


class _HeldForks:
    """The coroutine forks that signal handlers made while their thread was starting the
    background loop; the start hands them to the loop's group once it completes."""

    __slots__ = ("_forks",)

    def __init__(self) -> None:
        self._forks: list[tuple[Future[Any], Callable[..., Any], Args, Kwargs, Context]] = []

    def spawn(
        self, future: Future[Any], func: Callable[..., Any], args: Args, kwargs: Kwargs
    ) -> bool:
        """Hold ``await func(*args, **kwargs)`` for the loop being started, in the caller's
        context (copied, as a group does)."""
        self._forks.append((future, func, args, kwargs, copy_context()))
        return True

    def hand_to(self, group: AmbientGroup | None) -> None:
        """Spawn the held forks in ``group``; with none (the loop did not start), cancel
        them: their coroutines never ran."""
        forks = self._forks
        while forks:
            future, func, args, kwargs, context = forks.pop(0)
            if group is None or not context.run(group.spawn, future, func, args, kwargs):
                future.cancel()


class _CallbacksJob(Work):
    """Runs done callbacks on the worker pool, once; a waiter at exit may run it instead.

    The thread that runs it takes its parts out first, as a sync fork's job does: whoever
    still holds the job after it ran (a worker thread on its way back to the queue, a
    waiter's frame) holds neither the fork's future, nor its callbacks, nor ``ran``.
    """

    __slots__ = ("_parts",)

    stealable = True

    def __init__(
        self,
        ran: Future[None],
        future: Future[Any],
        callbacks: list[Callable[[Future[Any]], object]],
    ) -> None:
        self._parts: (
            tuple[Future[None], Future[Any], list[Callable[[Future[Any]], object]]] | None
        ) = (ran, future, callbacks)

    @property
    def taken(self) -> bool:
        parts = self._parts  # read once: a thread taking the job sets it to None
        return parts is None or parts[0].done()

    def steal(self) -> None:
        self()

    def __call__(self) -> None:
        parts = self._parts
        if parts is None or not claim(parts[0]):  # another thread took it
            return
        self._parts = None
        ran, future, callbacks = parts
        del parts
        try:
            run_callbacks(future, callbacks)
        finally:
            del future, callbacks
            settle(ran, None)


background = _Background()

if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=background.reset_in_child)
