"""The ambient group: the fork group of forks made outside any scope, one per event loop.

It lives in a task owned by the loop itself, started on first use; when the loop shuts
down, is closed, or stops for good, its pending forks are cancelled, each with a WARNING.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from functools import partial
from typing import Any

import anyio
from anyio.lowlevel import EventLoopToken

from . import _loops
from ._future import Future
from ._groups import ForkGroup
from ._state import settle_cancelled

__all__ = ["AmbientGroup", "ambient_group", "report_forks_of_stopped_loops"]

logger = logging.getLogger("anyfork")


class AmbientGroup(ForkGroup):
    """The task group of forks made outside any scope, one per event loop.

    It lives in a task owned by the loop itself, started on first use. When the loop shuts
    down, its pending forks are cancelled, each with a WARNING naming the fork.
    """

    def __init__(self, native: object, token: EventLoopToken, loop_thread: int) -> None:
        super().__init__(token, loop_thread)
        self.native = native
        self.host_task: object = None

    def start_host(self) -> None:
        self.loop_thread = threading.get_ident()
        self.host_task = _loops.spawn_detached(self.native, self._host)
        _loops.call_when_closed(self.native, partial(_on_loop_closed, weakref.ref(self)))

    def lose_pending(self, reason: str) -> None:
        """Close the group and cancel its pending forks, each with a WARNING naming it."""
        _forget_ambient(self)
        for future in self.close_now():
            self._lose(future, reason)

    async def _host(self) -> None:
        cancelled = anyio.get_cancelled_exc_class()  # not after its loop was closed
        try:
            async with anyio.create_task_group() as task_group:
                self.open(task_group)
                try:
                    await anyio.sleep_forever()
                finally:
                    # The loop is shutting down: take no more forks. Those made from now
                    # on (by sync forks still running in threads) run as where no loop
                    # runs, instead of being cancelled as soon as they start.
                    with self._lock:
                        self._closed = True
        except cancelled:
            pass  # the loop is shutting down; a trio system task must not raise
        finally:
            _forget_ambient(self)
            for future in self.close_now():
                self._lose(future, "its event loop shut down before it started")

    def _note_cancelled(self, future: Future[Any]) -> None:
        if settle_cancelled(future, unless_running=True):
            logger.warning(
                "fork %r was cancelled because its event loop shut down; use "
                "'async with anyfork.scope()' (or the app's lifespan) for work that must "
                "finish",
                future,
            )


_ambient_lock = threading.RLock()
_exit_report_registered = False
# Weak: a loop keeps its ambient group alive (asyncio holds the host task's sleep in its
# timers, trio its system tasks), never the other way round. A loop closed without
# cancelling its tasks (loop.run_until_complete, then loop.close()) must not be kept
# forever by this table.
_ambient_groups: weakref.WeakValueDictionary[int, AmbientGroup] = weakref.WeakValueDictionary()


def _forget_ambient_groups_in_child() -> None:
    """In a child made by ``os.fork``: forget every ambient group (their loops and tasks
    are the parent's; ``_groups`` abandons their forks)."""
    global _ambient_lock
    _ambient_lock = threading.RLock()
    _ambient_groups.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_ambient_groups_in_child)


def ambient_group(native: object, token: EventLoopToken | None = None) -> AmbientGroup:
    """Return the ambient group of the loop ``native``, creating it on first use.

    Called on the loop's thread (``token`` is None) or from a worker thread of that loop.
    """
    group = _ambient_groups.get(id(native))
    if group is not None and group.native is native:
        return group
    with _ambient_lock:
        group = _ambient_groups.get(id(native))
        if group is not None and group.native is native:
            return group
        if token is None:
            group = AmbientGroup(native, _loops.token_for(native), threading.get_ident())
            group.start_host()
        else:
            # The loop's thread is learnt when the host starts; until then every fork is
            # handed to the loop with call_soon, in order, and queued until the host is up.
            group = AmbientGroup(native, token, 0)
            if not _loops.call_soon(token, group.start_host):
                # The loop is no longer running (a sync fork outlived it): a closed group,
                # which takes no forks, so that they go where no loop runs.
                group.close_now()
                return group
        _ambient_groups[id(native)] = group
        global _exit_report_registered
        if not _exit_report_registered:
            # Python runs atexit hooks after the exit join (a threading at-exit hook), which
            # is registered only once a fork has run outside any loop.
            atexit.register(report_forks_of_stopped_loops)
            _exit_report_registered = True
        return group


def _on_loop_closed(group_ref: weakref.ref[AmbientGroup]) -> None:
    """The loop of an ambient group was closed; its host task ended first, unless the loop
    was closed without cancelling its tasks (``loop.run_until_complete``, then ``close``)."""
    group = group_ref()
    if group is None:
        return
    group.lose_pending(
        "its event loop was closed with the fork still pending (the loop's tasks were "
        "never cancelled; asyncio.run cancels them)"
    )
    _loops.forget_tasks_of_closed_loop(group.native, group.host_task)


def report_forks_of_stopped_loops() -> None:
    """At interpreter exit, report (and cancel) the forks still pending in the ambient
    group of a loop that is no longer running.

    Their work will never run: the loop stopped without cancelling its tasks (nest_asyncio's
    ``asyncio.run``, or ``loop.run_until_complete`` with no ``close``), so nothing else
    would report them.
    """
    for group in list(_ambient_groups.values()):
        if _loops.is_stopped(group.native) and group.pending_futures():
            group.lose_pending(
                "its event loop stopped with the fork unfinished and never ran again (the "
                "loop's tasks were never cancelled: asyncio.run cancels them, nest_asyncio's "
                "asyncio.run and loop.run_until_complete do not)"
            )


def _forget_ambient(group: AmbientGroup) -> None:
    with _ambient_lock:
        if _ambient_groups.get(id(group.native)) is group:
            del _ambient_groups[id(group.native)]
