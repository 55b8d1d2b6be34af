"""The runner of an options-wrapped fork (``_options.WithOptions``): its attempts, under its
limit, within its deadline, where a plain fork of the callable inside would run.

``fork`` makes the user's future and routes the fork here (one row of its table):

* a coroutine function: the fork is one task, where a coroutine fork made here runs
  (``_coroutine_fork``); it takes its place in the limit's line at ``fork()``, its task
  awaits the ticket (no thread), runs the attempts one after the other in a cancel scope
  whose deadline is the fork's, and gives its place back while it awaits a pending future
  (``_limits.TaskPlace``);
* a sync or remote callable: ``_sync_attempts``.
"""

from __future__ import annotations

import time
from contextvars import copy_context
from typing import Any

import anyio

from ._blocking import held_by_task
from ._coroutine_fork import start_coroutine_fork
from ._debug import show_attempts
from ._future import Future
from ._limits import TaskPlace
from ._options import WithOptions
from ._retries import AttemptState, chain_earlier, retried, timeout_error
from ._state import attach, on_done
from ._sync_attempts import AttemptsInThread, SyncRun
from ._sync_job import submit_sync_fork

__all__ = ["fork_with_options"]


def fork_with_options(
    future: Future[Any],
    options: WithOptions[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    native: object | None,
    eager: bool,
) -> None:
    """Run the fork of an options-wrapped callable, completing ``future``."""
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    if options.is_async:
        state = AttemptState()
        show_attempts(future, state)
        limit = options.limit
        if limit is not None:
            # Its place in line is taken now, in the order of the fork() calls; the task
            # gives it back, or, if the task never starts, the future's done callback.
            state.ticket = limit.take_or_queue()
            state.queued = state.ticket is not None
            state.pledge = [limit]
            on_done(future, state.never_started)
        start_coroutine_fork(
            future, _run_coroutine, (options, state, deadline, args, kwargs), {}, native, eager
        )
        return
    if deadline is None and not eager and not options.remote:
        # No deadline: all its attempts run in one job of the fork's own future, as a plain
        # sync fork's work (``AttemptsInThread``), once it has a place.
        limit = options.limit
        ticket = None if limit is None else limit.take_or_queue()
        if ticket is None:
            if limit is None and not options.retries:
                submit_sync_fork(future, options.func, args, kwargs, copy_context(), native)
                return
            body = AttemptsInThread(options, future, AttemptState() if options.retries else None)
            job = submit_sync_fork(future, body, args, kwargs, copy_context(), native)
            if limit is not None:
                body.job = job
                attach(future, body)
            return
        SyncRun(future, options, None, args, kwargs, native, eager).start(ticket)
        return
    SyncRun(future, options, deadline, args, kwargs, native, eager).start()


# --- coroutine forks: one task ------------------------------------------------------------


async def _run_coroutine(
    options: WithOptions[..., Any],
    state: AttemptState,
    deadline: float | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    if deadline is None:
        return await _coroutine_attempts(options, state, args, kwargs)
    with anyio.CancelScope(deadline=anyio.current_time() + deadline - time.monotonic()):
        return await _coroutine_attempts(options, state, args, kwargs)
    raise timeout_error(options)  # the deadline's cancellation ended the work


async def _coroutine_attempts(
    options: WithOptions[..., Any],
    state: AttemptState,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    if options.limit is None:
        return await _run_attempts(options, state, args, kwargs)
    try:
        limit = state.pledge.pop()
    except IndexError:  # the fork ended before its task started
        return None
    ticket, state.ticket = state.ticket, None
    if ticket is not None:
        try:
            await ticket
        except BaseException:
            if not limit.leave_line(ticket):
                limit.release()
            raise
        state.queued = False
    place = TaskPlace(limit)
    token = held_by_task.set(place)
    try:
        return await _run_attempts(options, state, args, kwargs)
    finally:
        held_by_task.reset(token)
        if place.holding:
            place.holding = False
            limit.release()


async def _run_attempts(
    options: WithOptions[..., Any],
    state: AttemptState,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    earlier: list[BaseException] = []
    while True:
        state.attempt += 1
        try:
            return await options.func(*args, **kwargs)
        except Exception as exc:
            if retried(options, exc, state.attempt):
                earlier.append(exc)
                continue
            chain_earlier(exc, earlier)
            raise
