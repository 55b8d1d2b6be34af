"""Where forks land on an event loop: a structured :class:`Scope`, or the loop's ambient
task group.

Both are a :class:`_ForkGroup`: an anyio task group on one loop plus the set of its pending
forks. Forks may be added from any thread; every fork's task runs on the group's loop, so
the bookkeeping that ends a fork (``_forget``) always happens on that loop's thread.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine
from contextvars import Context, ContextVar, copy_context
from functools import partial
from types import TracebackType
from typing import Any, NoReturn

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

from . import _loops
from ._future import _CANCELLED, _FAILED, _FINISHED, Future, callback_hand_off

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "Scope",
    "ambient_group",
    "current_scope_group",
    "report_forks_of_stopped_loops",
    "scope",
]

logger = logging.getLogger("anyfork")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]

# Set by the script fallback when it starts joining forks at interpreter exit.
exit_join_started = threading.Event()


class _ForkGroup:
    """A task group on one event loop, and the forks that belong to it."""

    def __init__(self, token: EventLoopToken, loop_thread: int):
        self.token = token
        self.loop_thread = loop_thread
        self._lock = threading.RLock()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._backlog: list[tuple[Future[Any], TaskFactory, Context | None]] = []
        self._pending: dict[Future[Any], anyio.TaskHandle[None] | None] = {}
        # The coroutines of forks whose task has not started: closed if it never does, so
        # that Python prints no "coroutine ... was never awaited" next to anyfork's warning.
        self._unstarted: dict[Future[Any], Coroutine[Any, Any, None]] = {}
        self._closed = False
        self._idle: anyio.Event | None = None
        # Set for the background loop's group: runs the done callbacks of futures completed
        # on its loop elsewhere (user callbacks never run on the background loop).
        self.callback_runner: Callable[[Future[Any], list[Callable[..., object]]], None] | None = (
            None
        )

    # --- any thread -------------------------------------------------------------------

    def spawn(self, future: Future[Any], factory: TaskFactory, context: Context | None) -> bool:
        """Run ``factory()`` as a task of this group, from any thread.

        :return: ``False`` if the group has closed and takes no more forks, or its loop is
            no longer running
        """
        with self._lock:
            if self._closed:
                return False
            self._pending[future] = None
        future._on_cancel = partial(self._cancel_task, future)
        if (
            threading.get_ident() == self.loop_thread
            and self._task_group is not None
            and _loops.in_task()
        ):
            self._start(future, factory, context)
            return True
        # Post the start from within the fork's context: anyio copies the posting context
        # (adding its note of which async library runs), so the task inherits both.
        start = partial(self._start, future, factory, None)
        posted = (
            context.run(_loops.call_soon, self.token, start)
            if context is not None
            else _loops.call_soon(self.token, start)
        )
        if not posted:
            # The loop is gone (a sync fork that outlived it is forking): the caller runs
            # the fork as from a thread with no loop.
            with self._lock:
                self._pending.pop(future, None)
            future._on_cancel = None
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
        future.add_done_callback(self._sync_fork_done)
        return True

    def _sync_fork_done(self, future: Future[Any]) -> None:
        # In the thread that completed it: a worker, a waiter, or the loop's (cancel()).
        if future._state == _FAILED:
            self._note_failed(future)
        self._forget(future)

    def pending_futures(self) -> list[Future[Any]]:
        with self._lock:
            return list(self._pending)

    def _cancel_task(self, future: Future[Any]) -> None:
        if threading.get_ident() == self.loop_thread:
            self._cancel_task_now(future)
        else:
            _loops.call_soon(self.token, partial(self._cancel_task_now, future))

    # --- the loop's thread ------------------------------------------------------------

    def _start(self, future: Future[Any], factory: TaskFactory, context: Context | None) -> None:
        task_group = self._task_group
        if task_group is None:
            self._backlog.append((future, factory, context or copy_context()))
            return
        coroutine = self._unstarted[future] = factory()
        try:
            if context is None:
                handle = task_group.create_task(coroutine, name=future.name)
            else:
                handle = context.run(task_group.create_task, coroutine, name=future.name)
        except RuntimeError:  # the task group is no longer active
            self._lose(future, "its task group has already shut down")
            return
        with self._lock:
            if future in self._pending:
                self._pending[future] = handle

    def _cancel_task_now(self, future: Future[Any]) -> None:
        if future in self._unstarted:
            # Its task starts, sees the cancelled future and returns; cancelling the task
            # could stop it before it starts, and its coroutine would never be awaited.
            return
        handle = self._pending.get(future)
        if handle is not None:
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
        self._forget(future)
        coroutine = self._unstarted.pop(future, None)
        if coroutine is not None:
            coroutine.close()
        if future._complete(_CANCELLED, None, None, unless_running=True):
            logger.warning("anyfork: fork %r was cancelled because %s", future, reason)

    def _open(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group
        backlog, self._backlog = self._backlog, []
        for item in backlog:
            self._start(*item)

    async def _wait_idle(self, *, close: bool = False) -> None:
        """Wait until no fork is pending; with ``close``, then refuse new ones (atomically)."""
        while True:
            with self._lock:
                if not self._pending:
                    self._closed = self._closed or close
                    return
                self._idle = anyio.Event()
            await self._idle.wait()

    def _close_now(self) -> list[Future[Any]]:
        with self._lock:
            self._closed = True
            return list(self._pending)

    # --- the fork's task ----------------------------------------------------------------

    async def run_coroutine_fork(
        self,
        future: Future[Any],
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._unstarted.pop(future, None)
        if self.callback_runner is not None:
            callback_hand_off.runner = self.callback_runner
        try:
            if future.done():  # cancelled before its task started
                return
            try:
                result = await func(*args, **kwargs)
            except anyio.get_cancelled_exc_class() as exc:
                _drop_own_frame(exc)
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
                future._complete(_FAILED, None, _drop_own_frame(exc))
                self._note_failed(future)
            else:
                future._complete(_FINISHED, result, None)
        finally:
            self._forget(future)
            # On Python 3.12+ the frames of a failure's traceback link back to this one
            # (f_back), which must then not hold the future the failure is stored in.
            del future

    def _note_cancelled(self, future: Future[Any]) -> None:
        future._complete(_CANCELLED, None, None, unless_running=True)

    def _note_failed(self, future: Future[Any]) -> None:
        pass

    def _note_stray_cancellation(self, future: Future[Any], cancellation: BaseException) -> None:
        # The cancellation becomes the cause of the anyfork.CancelledError waiters get.
        if future._complete(_CANCELLED, None, cancellation):
            logger.warning(
                "anyfork: fork %r ended with a cancellation that came from neither its "
                "future, its scope nor its event loop (it awaited something that was "
                "cancelled?); only this fork is cancelled, its siblings keep running. The "
                "cancellation is the __cause__ of the anyfork.CancelledError its waiters get",
                future,
            )


def _drop_own_frame(exc: BaseException) -> BaseException:
    """Drop the caller's frame from the top of ``exc``'s traceback, and return ``exc``.

    That frame is anyfork's, not the user's, and it holds the future (and the group) the
    exception is stored in: keeping it would put every failed future in a reference cycle,
    freed only by a garbage collection pass instead of when its last reference goes.
    """
    traceback = exc.__traceback__
    if traceback is not None and traceback.tb_frame is sys._getframe(1):
        exc.with_traceback(traceback.tb_next)
    return exc


class _AmbientGroup(_ForkGroup):
    """The task group of forks made outside any scope, one per event loop.

    It lives in a task owned by the loop itself, started on first use. When the loop shuts
    down, its pending forks are cancelled, each with a WARNING naming the fork.
    """

    def __init__(self, native: object, token: EventLoopToken, loop_thread: int) -> None:
        super().__init__(token, loop_thread)
        self.native = native
        self._host_task: object = None

    def start_host(self) -> None:
        self.loop_thread = threading.get_ident()
        self._host_task = _loops.spawn_detached(self.native, self._host)
        _loops.call_when_closed(self.native, partial(_on_loop_closed, weakref.ref(self)))

    def lose_pending(self, reason: str) -> None:
        """Close the group and cancel its pending forks, each with a WARNING naming it."""
        _forget_ambient(self)
        for future in self._close_now():
            self._lose(future, reason)

    async def _host(self) -> None:
        cancelled = anyio.get_cancelled_exc_class()  # not after its loop was closed
        try:
            async with anyio.create_task_group() as task_group:
                self._open(task_group)
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
            for future in self._close_now():
                self._lose(future, "its event loop shut down before it started")

    def _note_cancelled(self, future: Future[Any]) -> None:
        if future._complete(_CANCELLED, None, None, unless_running=True):
            logger.warning(
                "anyfork: fork %r was cancelled because its event loop shut down; use "
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
_ambient_groups: weakref.WeakValueDictionary[int, _AmbientGroup] = weakref.WeakValueDictionary()


def forget_ambient_groups_in_child() -> list[Future[Any]]:
    """In a child made by ``os.fork``: forget every loop's ambient group (their loops and
    tasks are the parent's) and return their pending forks."""
    global _ambient_lock
    _ambient_lock = threading.RLock()
    inherited = [future for group in list(_ambient_groups.values()) for future in group._pending]
    _ambient_groups.clear()
    return inherited


def ambient_group(native: object, token: EventLoopToken | None = None) -> _AmbientGroup:
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
            group = _AmbientGroup(native, _loops.token_for(native), threading.get_ident())
            group.start_host()
        else:
            # The loop's thread is learnt when the host starts; until then every fork is
            # handed to the loop with call_soon, in order, and queued until the host is up.
            group = _AmbientGroup(native, token, 0)
            if not _loops.call_soon(token, group.start_host):
                # The loop is no longer running (a sync fork outlived it): a closed group,
                # which takes no forks, so that they go where no loop runs.
                group._closed = True
                return group
        _ambient_groups[id(native)] = group
        global _exit_report_registered
        if not _exit_report_registered:
            # Python runs atexit hooks after the exit join (a threading at-exit hook), which
            # is registered only once a fork has run outside any loop.
            atexit.register(report_forks_of_stopped_loops)
            _exit_report_registered = True
        return group


def _on_loop_closed(group_ref: weakref.ref[_AmbientGroup]) -> None:
    """The loop of an ambient group was closed; its host task ended first, unless the loop
    was closed without cancelling its tasks (``loop.run_until_complete``, then ``close``)."""
    group = group_ref()
    if group is None:
        return
    group.lose_pending(
        "its event loop was closed with the fork still pending (the loop's tasks were "
        "never cancelled; asyncio.run cancels them)"
    )
    _loops.forget_tasks_of_closed_loop(group.native, group._host_task)


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


def _forget_ambient(group: _AmbientGroup) -> None:
    with _ambient_lock:
        if _ambient_groups.get(id(group.native)) is group:
            del _ambient_groups[id(group.native)]


# The innermost open scope of the current context. Forks copy the context, so forks made
# by a scope's forks (in tasks and in worker threads alike) find the same scope.
_current_scope: ContextVar[Scope | None] = ContextVar("anyfork_current_scope", default=None)


def current_scope_group() -> _ForkGroup | None:
    active = _current_scope.get()
    return None if active is None else active._fork_group()


class Scope:
    """A structured home for forks; create it with :func:`anyfork.scope`.

    Forks made inside ``async with anyfork.scope():`` — including forks made by those forks,
    in tasks and in worker threads — belong to the scope. On exit the scope waits for all of
    them to finish, then raises an :class:`ExceptionGroup` of the failures nobody retrieved.
    A failing fork cancels neither its siblings nor the body. Cancelling the task that runs
    the scope cancels its forks.
    """

    def __init__(self, *, cancel_pending: bool = False) -> None:
        """
        :param cancel_pending: on exit, cancel the forks still pending instead of waiting
            for them (sync forks already running in a thread are still waited for)
        """
        if not isinstance(cancel_pending, bool):
            raise TypeError(f"cancel_pending must be True or False, got {cancel_pending!r}")
        self.cancel_pending = cancel_pending
        self._group: _ScopeGroup | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._context_token: Any = None

    def __repr__(self) -> str:
        pending = 0 if self._group is None else len(self._group.pending_futures())
        return f"<anyfork.Scope pending={pending}>"

    def cancel(self) -> None:
        """Cancel every fork of this scope that is still pending."""
        if self._group is not None:
            for future in self._group.pending_futures():
                future.cancel()

    def _fork_group(self) -> _ForkGroup | None:
        """The group that forks made in this scope join (integrations may redirect it)."""
        return self._group

    def _report_failures(self, failures: list[BaseException], exc: BaseException | None) -> None:
        """Report the failures nobody retrieved, at exit: a scope raises them together."""
        errors: list[BaseException] = [] if exc is None else [exc]
        errors.extend(failures)
        raise BaseExceptionGroup("failures of forks in an anyfork scope", errors)

    def __enter__(self) -> NoReturn:
        raise TypeError(
            "anyfork.scope() is an async context manager: use 'async with anyfork.scope():' "
            "inside a coroutine (a script needs no scope: its forks are joined at exit)"
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ raises
        pass

    async def __aenter__(self) -> Scope:
        if self._group is not None:
            raise RuntimeError("an anyfork.Scope can be entered only once; create a new one")
        native = _loops.running_native_loop()
        if native is None:  # pragma: no cover - only reachable by driving __aenter__ by hand
            raise RuntimeError("anyfork.scope() must be entered in async code")
        ambient = ambient_group(native)
        self._group = _ScopeGroup(ambient.token, threading.get_ident())
        self._task_group = anyio.create_task_group()
        self._group._open(await self._task_group.__aenter__())
        self._context_token = _current_scope.set(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._group is not None
        assert self._task_group is not None
        _current_scope.reset(self._context_token)
        group = self._group
        if self.cancel_pending:
            self.cancel()
        try:
            await group._wait_idle(close=True)
        except BaseException as join_exc:
            # The task running the scope was cancelled while joining: cancel the forks too.
            for future in group._close_now():
                future.cancel()
            try:
                await self._task_group.__aexit__(type(join_exc), join_exc, join_exc.__traceback__)
            finally:
                # Sync forks already running in worker threads cannot be stopped: the
                # scope still ends after them, as a task ends after its to_thread.run_sync.
                with anyio.CancelScope(shield=True):
                    await group._wait_idle()
            raise
        if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
            await self._task_group.__aexit__(exc_type, exc, traceback)
        else:
            # Every fork has finished, so there is nothing left to cancel; passing the
            # body's exception on would only make anyio wrap it in an ExceptionGroup.
            await self._task_group.__aexit__(None, None, None)

        failures = group.take_unretrieved_failures()
        if failures:
            self._report_failures(failures, exc)


class _ScopeGroup(_ForkGroup):
    def __init__(self, token: EventLoopToken, loop_thread: int):
        super().__init__(token, loop_thread)
        self._failed: list[Future[Any]] = []

    def _note_failed(self, future: Future[Any]) -> None:
        self._failed.append(future)

    def take_unretrieved_failures(self) -> list[BaseException]:
        failures: list[BaseException] = []
        for future in self._failed:
            if not future._retrieved and future._exception is not None:
                future._mark_retrieved()
                failures.append(future._exception)
        self._failed.clear()
        return failures


def scope(*, cancel_pending: bool = False) -> Scope:
    """Open a structured scope for forks: ``async with anyfork.scope(): ...``.

    :param cancel_pending: on exit, cancel the forks still pending instead of waiting for
        them to finish

    Example::

        async with anyfork.scope():
            user = anyfork.fork(fetch_user, 42)
            anyfork.fork(write_audit_log, "viewed", 42)  # finishes before the scope exits
            print(await user)
    """
    return Scope(cancel_pending=cancel_pending)
