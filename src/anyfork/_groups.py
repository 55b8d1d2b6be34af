"""Fork groups: an anyio task group on one event loop plus the forks that belong to it.

A **fork group** holds the forks of one :class:`~anyfork.Scope` (see ``_scope.py``) or of
one loop's **ambient group** (``_ambient.py``), the home of forks made outside any scope,
created per loop on first use. Coroutine forks are tasks of the group's task group; sync
forks run on the worker pool and are only counted here (a scope joins them). Forks may be
added from any thread; a coroutine fork's task runs on the group's loop.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable
from contextvars import Context, copy_context
from functools import partial
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

from . import _loops
from ._callbacks import callback_hand_off
from ._future import Future
from ._state import (
    Work,
    abandon_in_child,
    attach,
    has_failed,
    on_done,
    settle,
    settle_cancelled,
    settle_failed,
    without_catching_frame,
)

__all__ = [
    "ForkGroup",
    "live_groups",
]

logger = logging.getLogger("anyfork")

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


class ForkGroup(Work):
    """A task group on one event loop, and the forks that belong to it.

    It is also the :class:`~anyfork._state.Work` attached to each of its coroutine forks'
    futures (cancelling one cancels its task, on the group's loop): one object for all of
    them, so that a fork allocates none of its own.
    """

    kind = "task"

    def __init__(self, token: EventLoopToken, loop_thread: int):
        self.token = token
        self.loop_thread = loop_thread
        self._lock = threading.RLock()
        _live_groups.add(self)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._backlog: list[tuple[Future[Any], Callable[..., Any], Args, Kwargs, Context]] = []
        # A coroutine fork's task handle once its task is created (None before, and for
        # sync forks). The coroutine of a fork whose task never starts is closed, so that
        # Python prints no "coroutine ... was never awaited" next to anyfork's warning.
        self._pending: dict[Future[Any], anyio.TaskHandle[None] | None] = {}
        self._closed = False
        self._idle: anyio.Event | None = None
        # Set for the background loop's group: runs the done callbacks of futures completed
        # on its loop elsewhere (user callbacks never run on the background loop).
        self.callback_runner: Callable[[Future[Any], list[Callable[..., object]]], None] | None = (
            None
        )

    # --- any thread -------------------------------------------------------------------

    def spawn(
        self, future: Future[Any], func: Callable[..., Any], args: Args, kwargs: Kwargs
    ) -> bool:
        """Run ``await func(*args, **kwargs)`` as a task of this group, completing
        ``future``, from any thread, in the caller's context (copied).

        :return: ``False`` if the group has closed and takes no more forks, or its loop is
            no longer running
        """
        with self._lock:
            if self._closed:
                return False
            self._pending[future] = None
        attach(future, self)
        if (
            threading.get_ident() == self.loop_thread
            and self._task_group is not None
            and _loops.in_task()
        ):
            self._start(future, func, args, kwargs)  # the task copies this context
            return True
        # anyio copies the posting context (adding its note of which async library runs)
        # for the posted call, so the task inherits both.
        if not _loops.call_soon(self.token, partial(self._start, future, func, args, kwargs)):
            # The loop is gone (a sync fork that outlived it is forking): the caller runs
            # the fork as from a thread with no loop.
            with self._lock:
                self._pending.pop(future, None)
            attach(future, None)
            return False
        return True

    def track_sync_fork(self, future: Future[Any]) -> bool:
        """Count a sync fork (run by the worker pool) among this group's pending forks.

        :return: ``False`` if the group has closed and takes no more forks
        """
        with self._lock:
            if self._closed:
                return False
            self._pending[future] = None
        on_done(future, self._sync_fork_done)
        return True

    def _sync_fork_done(self, future: Future[Any]) -> None:
        # In the thread that completed it: a worker, a waiter, or the loop's (cancel()).
        if has_failed(future):
            self._note_failed(future)
        self._forget(future)

    # The Work of its coroutine forks' futures (see the class docstring): state and cancel.

    def state(self, future: Future[Any]) -> str:
        """``"running"`` once a coroutine fork's task has started, else ``"queued"``."""
        with self._lock:
            handle = self._pending.get(future)
        return "running" if handle is not None and not _unstarted(handle) else "queued"

    @property
    def closed(self) -> bool:
        """Whether the group takes no more forks."""
        return self._closed

    def pending_futures(self) -> list[Future[Any]]:
        with self._lock:
            return list(self._pending)

    def cancel(self, future: Future[Any]) -> None:
        """Cancel the task of a coroutine fork whose future was just cancelled."""
        if threading.get_ident() == self.loop_thread:
            self._cancel_task_now(future)
        else:
            _loops.call_soon(self.token, partial(self._cancel_task_now, future))

    # --- the loop's thread ------------------------------------------------------------

    def _start(
        self,
        future: Future[Any],
        func: Callable[..., Any],
        args: Args,
        kwargs: Kwargs,
        context: Context | None = None,
    ) -> None:
        task_group = self._task_group
        if task_group is None:
            self._backlog.append((future, func, args, kwargs, context or copy_context()))
            return
        coroutine = self.run_coroutine_fork(future, func, args, kwargs)
        try:
            if context is None:
                handle = task_group.create_task(coroutine, name=future.name)
            else:
                handle = context.run(task_group.create_task, coroutine, name=future.name)
        except RuntimeError:  # the task group is no longer active
            self._lose(future, "its task group has already shut down")
            return
        # No lock: only this (the loop's) thread forgets a coroutine fork, and one dict
        # operation is atomic.
        if future in self._pending:
            self._pending[future] = handle

    def _cancel_task_now(self, future: Future[Any]) -> None:
        handle = self._pending.get(future)
        # A task that has not started yet starts, sees the cancelled future and returns;
        # cancelling it could stop it before it starts, and its coroutine would never be
        # awaited.
        if handle is not None and not _unstarted(handle):
            handle.cancel()

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.pop(future, None)
            idle = self._idle if not self._pending else None
        if idle is not None:
            if threading.get_ident() == self.loop_thread:
                idle.set()
            else:  # a sync fork finished in its worker thread
                _loops.call_soon(self.token, idle.set)

    def _lose(self, future: Future[Any], reason: str) -> None:
        """Cancel a fork whose work can no longer run, and say so."""
        handle = self._pending.get(future)
        self._forget(future)
        if handle is not None and _unstarted(handle):
            handle.coro.close()
        if settle_cancelled(future, unless_running=True):
            logger.warning("fork %r was cancelled because %s", future, reason)

    def open(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group
        backlog, self._backlog = self._backlog, []
        for item in backlog:
            self._start(*item)

    async def wait_idle(self, *, close: bool = False) -> None:
        """Wait until no fork is pending; with ``close``, then refuse new ones (atomically)."""
        while True:
            with self._lock:
                if not self._pending:
                    self._closed = self._closed or close
                    return
                self._idle = anyio.Event()
            await self._idle.wait()

    def close_now(self) -> list[Future[Any]]:
        with self._lock:
            self._closed = True
            return list(self._pending)

    def abandon_in_child(self) -> list[Future[Any]]:
        """In a child made by ``os.fork``: close for good, forget the pending forks (the
        parent's) and return them."""
        self._lock = threading.RLock()  # another thread of the parent may have held it
        self._closed = True
        pending, self._pending = list(self._pending), {}
        self._backlog = []
        return pending

    # --- the fork's task ----------------------------------------------------------------

    async def run_coroutine_fork(
        self,
        future: Future[Any],
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        if self.callback_runner is not None:
            callback_hand_off.runner = self.callback_runner
        try:
            if future.done():  # cancelled before its task started
                return
            try:
                result = await func(*args, **kwargs)
            except anyio.get_cancelled_exc_class() as exc:
                without_catching_frame(exc)
                try:
                    # Raises if an enclosing anyio cancel scope was cancelled: the fork's own
                    # cancel(), its scope or task group, or (on trio) the loop's shutdown.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    natively = _loops.task_cancelled_natively()  # asyncio.run's shutdown
                    if not natively:
                        # Python 3.10 counts no native cancellations: give the loop one step,
                        # in which a shutdown cancels this fork's group (and so this task).
                        await anyio.lowlevel.checkpoint()
                except anyio.get_cancelled_exc_class():
                    self._note_cancelled(future)
                    raise
                if natively:
                    self._note_cancelled(future)
                    raise
                # A stray cancellation: the work awaited something that somebody else
                # cancelled. Re-raising it would make the task group cancel every sibling
                # (and a scope's body), so it ends this fork alone.
                self._note_stray_cancellation(future, exc)
            except BaseException as exc:
                settle_failed(future, without_catching_frame(exc))
                self._note_failed(future)
            else:
                settle(future, result)
        finally:
            self._forget(future)
            # On Python 3.12+ the frames of a failure's traceback link back to this one
            # (f_back), which must then not hold the future the failure is stored in.
            del future

    def _note_cancelled(self, future: Future[Any]) -> None:
        settle_cancelled(future, unless_running=True)

    def _note_failed(self, future: Future[Any]) -> None:
        pass

    def _note_stray_cancellation(self, future: Future[Any], cancellation: BaseException) -> None:
        # The cancellation becomes the cause of the anyfork.CancelledError waiters get.
        if settle_cancelled(future, cancellation):
            logger.warning(
                "fork %r ended with a cancellation that came from neither its "
                "future, its scope nor its event loop (it awaited something that was "
                "cancelled?); only this fork is cancelled, its siblings keep running. The "
                "cancellation is the __cause__ of the anyfork.CancelledError its waiters get",
                future,
            )


def _unstarted(handle: anyio.TaskHandle[None]) -> bool:
    """Whether the coroutine of a fork's task has not started running yet."""
    return inspect.getcoroutinestate(handle.coro) == inspect.CORO_CREATED


# Every fork group alive, for anyfork.pending(); a group goes with its scope or loop.
_live_groups: weakref.WeakSet[ForkGroup] = weakref.WeakSet()


def live_groups() -> list[ForkGroup]:
    """The fork groups alive now (a snapshot)."""
    for _ in range(10):  # another thread may add one while we copy
        try:
            return list(_live_groups)
        except RuntimeError:  # pragma: no cover - "changed size during iteration"
            continue
    return []  # pragma: no cover


def _forget_groups_in_child() -> None:
    """In a child made by ``os.fork``: forget every fork group, scopes' and ambient ones
    (their loops and tasks are the parent's), and every loop this thread was bound to.

    The child starts clean wherever it was made (inside a scope, in a sync fork of a loop):
    the scope still in its context is closed, so its forks go where no loop runs, and
    ``pending()`` lists none of the parent's forks; those read as cancelled there.
    """
    _loops.forget_loops_in_child()
    inherited = [f for group in live_groups() for f in group.abandon_in_child()]
    _live_groups.clear()
    for future in inherited:
        abandon_in_child(future)


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_groups_in_child)
