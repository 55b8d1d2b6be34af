"""The runner of a sync fork: its job on the worker pool (:class:`SyncJob`), and how a fork
gets there (:func:`submit_sync_fork`).

It sits next to ``_pool`` rather than in it: the pool is a generic runner of jobs that
knows nothing of futures, scopes or the exit join (``_exit`` imports it), while the job
settles a future, tells the exit join when its work is over and is joined by a scope.
"""

from __future__ import annotations

import contextvars
import inspect
import types
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias, cast

from anyio.lowlevel import EventLoopToken

from . import _loops
from ._cancel import StopState, is_cancellation, running
from ._coroutine_fork import run_returned_coroutine
from ._exit import exit_join
from ._future import Future
from ._pool import hand_over, is_deferred, submit_fork
from ._scope import current_scope_group
from ._state import (
    Work,
    attach,
    claim,
    settle,
    settle_cancelled,
    settle_failed,
    without_catching_frame,
)
from ._torch import capture_grad_mode

__all__ = ["SyncJob", "SyncJobParts", "loop_token_here", "submit_attempt", "submit_sync_fork"]


def submit_sync_fork(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: contextvars.Context,
    native: object | None,
) -> SyncJob:
    """Send a sync fork to the worker pool, tied to the loop and scope it was made in;
    return its job.

    The loop (of this thread, or of the anyio or anyfork worker thread this is) goes with
    the job, so that inside it ``anyio.from_thread`` and new forks find that loop. A scope
    joins the fork; a fork made outside any scope is joined only at interpreter exit.
    """
    group = current_scope_group()
    token: EventLoopToken | None
    if group is not None and group.track_sync_fork(future):
        token = group.token
    else:
        token = loop_token_here(native)
    # The pool outlives loops: the exit join waits for the fork (the job tells it when its
    # work is over).
    exit_join.track(future, forget_when_done=False)
    job = SyncJob((future, func, args, kwargs, context, capture_grad_mode(), token))
    attach(future, job)  # a blocking waiter may run it inline
    # On a loop's thread the job reaches the pool when the loop next gets control: a
    # blocking wait before that runs it in the caller, as torch.jit.wait does.
    submit_fork(job, native)
    return job


def loop_token_here(native: object | None) -> EventLoopToken | None:
    """The loop a sync fork made here belongs to: the one running in this thread, or the
    one whose anyio worker thread this is; ``None`` where no loop is reachable."""
    if native is not None:
        return _loops.token_for(native)
    return _loops.worker_thread_token()


def submit_attempt(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: contextvars.Context,
    grad_mode: Callable[..., Any] | None,
    token: EventLoopToken | None,
) -> SyncJob:
    """Send one attempt of an options-wrapped sync fork (``_attempts``) to the worker pool
    now, from any thread, with what was captured when it was forked. The exit join waits
    for it; no scope counts it (the scope counts the fork's own future)."""
    exit_join.track(future, forget_when_done=False)
    job = SyncJob((future, func, args, kwargs, context, grad_mode, token))
    attach(future, job)
    submit_fork(job, None)
    return job


#: What a sync fork's job runs, ``context.run(func, *args, **kwargs)`` for ``future``:
#: ``(future, func, args, kwargs, context, grad_mode, token)``. ``grad_mode`` (torch
#: imported) runs the work in the grad and inference mode of the forking thread; ``token``
#: is the loop the fork belongs to (``anyio.from_thread`` and new forks in it find it).
#: A plain tuple, unpacked by name in one place (``SyncJob.__call__``): a NamedTuple's
#: construction and unpacking cost 0.3-0.4 µs, 6-7 % of a sync fork and wait.
SyncJobParts: TypeAlias = tuple[
    Future[Any],
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any],
    contextvars.Context,
    "Callable[..., Any] | None",
    "EventLoopToken | None",
]


class SyncJob(StopState, Work):
    """A sync fork's work; the first thread to call it with the future still pending runs it:
    a worker of the pool or a waiter. ``grad_mode``, when torch is imported, runs the work in
    the grad and inference mode of the thread that forked it; ``token`` is the loop the fork
    belongs to.

    It is also the fork's :class:`~anyfork._cancel.StopState`: ``cancel()`` on the running
    fork, its scope's cancellation or its deadline ask it to stop, and while it runs,
    ``check_cancelled()`` in its thread finds it. Made in the forking thread, it links to
    the sync fork running there (if any), whose stop requests then reach it too.

    The thread that runs it takes the work out first, so once the work has run nothing holds
    the future or the work's arguments through the job: neither this object (kept by a
    worker queue or a waiter's frame) nor the frames of the threads that called it, which a
    failure's traceback keeps alive (see ``without_catching_frame``).
    """

    __slots__ = ("_parts",)

    stealable = True
    kind = "worker thread"

    def __init__(self, parts: SyncJobParts) -> None:
        # StopState's fields, set here: a call of its __init__ costs 3 % of a fork and wait.
        self.asked = False
        self.parent = running.cell.fork  # the sync fork making this one, if any
        self.future = None
        self._parts: SyncJobParts | None = parts

    @property
    def taken(self) -> bool:
        """Whether a thread has run it (or it was cancelled before anyone did)."""
        parts = self._parts  # read once: a thread taking the job sets it to None
        return parts is None or parts[0].done()

    def steal(self) -> None:
        # On a loop's thread, only a fork made since the loop last got control runs in the
        # caller (forked and waited for with no await between them): which forks run there
        # then follows from the code, never from how fast a worker thread picked one up.
        if _loops.running_native_loop() is not None and not is_deferred(self):
            return
        self(inline=True)

    def awaited(self) -> None:
        hand_over(self)

    def cancel(self, future: Future[Any]) -> None:
        exit_join.discard(future)  # it will never run

    def __call__(self, inline: bool = False) -> None:
        """Run the work, unless it was cancelled or another thread took it.

        :param inline: a waiter runs it in its own thread; then a KeyboardInterrupt or
            SystemExit the work raises is re-raised to that waiter (after completing the
            future with it), since it is meant for the program, not for the fork
        """
        parts = self._parts
        if parts is None:  # another thread took it
            return
        if not claim(parts[0]):  # cancelled, or another thread took it
            # Only a fork that is over leaves the exit join here: one that another thread
            # is running stays tracked until that thread's run discards it.
            if parts[0].done():
                exit_join.discard(parts[0])
            return
        self._parts = None
        future, func, args, kwargs, context, grad_mode, token = parts
        del parts
        loop_claim = None
        if (
            token is not None
            and _loops.worker_thread_token() is not token
            and _loops.running_native_loop() is None  # not a waiter on a loop's thread
        ):
            loop_claim = _loops.WorkerThreadClaim(token)
        try:
            try:
                # check_cancelled() in this thread finds this fork while its work runs.
                cell = running.cell
                outer = cell.fork
                cell.fork = self
                self.future = future
                try:
                    # Even if asked to stop before it started, it runs: a request only
                    # reaches work that checks, never code that did not opt in.
                    if grad_mode is None:
                        result = context.run(func, *args, **kwargs)
                    else:
                        result = context.run(grad_mode, func, *args, **kwargs)
                finally:
                    # The work is over: the done callbacks that completing the future runs
                    # in this thread, and the forks they make, are not this fork's.
                    cell.fork = outer
                    self.future = None
            except BaseException as exc:
                # Let go of the work's objects before completing: once the future is done
                # the program may exit, and a daemon thread that frees objects (a torch
                # tensor) while the interpreter finalizes can abort the process.
                del func, args, kwargs, context, grad_mode
                if inline and isinstance(exc, RuntimeError):
                    _explain_run_on_the_loop(exc, future)
                if is_cancellation(exc) and self.stop_asked():
                    # It was asked to stop and let the cancellation propagate: cancelled,
                    # not failed. The cause says why, without the work's frames (and the
                    # tensors they hold) that a traceback would keep alive.
                    settle_cancelled(future, exc.with_traceback(None))
                else:
                    settle_failed(future, without_catching_frame(exc))
                if inline and isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            else:
                if type(result) is types.CoroutineType:
                    returned = cast("Coroutine[Any, Any, Any]", result)
                    context.run(run_returned_coroutine, future, returned, False)
                    del func, args, kwargs, context, grad_mode, result, returned
                    return
                del func, args, kwargs, context, grad_mode
                if isinstance(result, _ASYNC_RESULTS):
                    settle_failed(future, _not_a_sync_result(future, result))
                else:
                    settle(future, result)
        finally:
            exit_join.discard(future)
            if loop_claim is not None:
                loop_claim.release()
            del future


def _explain_run_on_the_loop(exc: RuntimeError, future: Future[Any]) -> None:
    """Say, on a RuntimeError of a sync fork that a blocking wait ran on a loop's thread,
    why calls that need a worker thread of the loop (``anyio.from_thread``, an SDK's
    ``asyncio.run``) fail there, and what to do instead."""
    if _loops.running_native_loop() is None:
        return
    note = (
        f"anyfork: {future.name} ran in the caller, on the event loop's thread: a blocking "
        "wait (anyfork.wait, Future.wait, wait_all) asked for it before the loop handed it "
        "to a worker thread. There, anyio.from_thread cannot reach the loop and asyncio.run "
        "cannot start one. Use 'await fut' (or 'await anyfork.wait_async(fut)') instead: it "
        "runs in a worker thread of the loop, as sync forks do."
    )
    notes: object = getattr(exc, "__notes__", None)
    if notes is None:  # set by hand on Python 3.10 (no add_note); exceptiongroup prints it
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]
        except AttributeError:  # pragma: no cover - an exception type with __slots__
            return
    if isinstance(notes, list):
        cast("list[str]", notes).append(note)


# What a sync fork must not return: only a task could await or iterate them.
_ASYNC_RESULTS = (types.CoroutineType, types.AsyncGeneratorType)


def _not_a_sync_result(future: Future[Any], result: Any) -> TypeError:
    """The error for a sync fork that returned a coroutine or an async generator, which
    only a task could use."""
    if inspect.iscoroutine(result):  # not a native coroutine (those run as tasks)
        result.close()
        return TypeError(
            f"{future.name} returned a coroutine-like object from a worker thread; declare "
            "it with 'async def' (or fork the coroutine function itself) so that anyfork "
            "runs it as a task"
        )
    return TypeError(  # an async generator
        f"{future.name} returned an async generator from a worker thread, which "
        "nothing there can iterate; fork a coroutine function that consumes it "
        "instead, e.g. 'async def collect(): return [item async for item in agen]'"
    )
