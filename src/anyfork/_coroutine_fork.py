"""Where a coroutine fork runs: a task of the caller's scope or loop, else the background
loop; and eager mode's run in the caller.

A coroutine fork joins the innermost scope's fork group, else the ambient group of the
loop running here (or of the loop whose worker thread this is); where no loop is reachable
it goes to the background loop. A sync fork that returned a coroutine hands it here too
(:func:`run_returned_coroutine`), so it runs where a coroutine fork made by the sync fork's
caller would. Eager mode's :func:`run_now` lives here as well, because both kinds of fork
use it and a returned coroutine is run through it.
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable, Coroutine
from typing import Any, cast

import anyio

from . import _loops
from ._ambient import ambient_group
from ._background import background
from ._future import Future
from ._groups import ForkGroup
from ._scope import current_scope_group
from ._state import release_claim, settle, settle_failed, without_catching_frame

__all__ = ["run_now", "run_returned_coroutine", "start_coroutine_fork"]


def start_coroutine_fork(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    native: object | None,
    eager: bool,
) -> None:
    """Run ``await func(*args, **kwargs)`` where a coroutine fork made here runs."""
    try:
        # A coroutine fork's task copies the context itself, when it is created here or when
        # its start is posted to the loop (anyio copies the posting context): no copy needed.
        group = _group_for_caller(native)
        if group is None and eager:
            # Eager mode runs a coroutine fork in the caller only where no loop is reachable:
            # one made on a loop, or from a loop's worker thread, needs that loop.
            run_now(future, func, args, kwargs, True, contextvars.copy_context())
            return
        if group is not None:
            if group.spawn(future, func, args, kwargs):
                return
            # The scope captured in this context has closed: use the loop's ambient group.
            group = _ambient_for(group)
            if group.spawn(future, func, args, kwargs):
                return
            # The loop is no longer running (a sync fork outlived it): as from a thread with
            # no loop, so that the work still runs and the fork's result is kept.
        loop_group = background.loop_group()
        if loop_group is None:
            # Python 3.12 starts no thread once the interpreter is exiting, so the background
            # loop cannot start during the exit join: run the coroutine here.
            run_now(future, func, args, kwargs, True, contextvars.copy_context())
            return
        if not loop_group.spawn(future, func, args, kwargs):
            # The background loop is gone (it failed): run the coroutine here rather than
            # leave its future pending forever.
            run_now(future, func, args, kwargs, True, contextvars.copy_context())
    finally:
        # A failure's traceback keeps this frame alive (f_back of run_now's).
        del future, func, args, kwargs


async def _await_returned(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return await coroutine


def run_returned_coroutine(
    future: Future[Any], coroutine: Coroutine[Any, Any, Any], eager: bool
) -> None:
    """A sync fork returned a coroutine (``fork(lambda: fetch(1))``, or a ``def`` typed to
    return one): run it as a coroutine fork of the same future, where one made by the sync
    fork's caller would run, in the fork's context (its scope). Its type says
    ``Future[T]`` for a ``Callable[..., Coroutine[Any, Any, T]]``, and a checker cannot tell
    such a callable from an ``async def``: this makes the run time agree."""
    release_claim(future)  # a task's fork: cancellable until it ends, as any coroutine fork
    try:
        start_coroutine_fork(
            future, _await_returned, (coroutine,), {}, _loops.running_native_loop(), eager
        )
    except BaseException as exc:  # it could not start (ShutdownError): the fork fails with it
        coroutine.close()
        settle_failed(future, without_catching_frame(exc))
    finally:
        del future, coroutine  # see start_coroutine_fork


def run_now(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    context: contextvars.Context,
) -> None:
    """Run the fork here and now, in the caller (eager mode, or no loop can take it)."""
    try:
        try:
            if is_async:
                result = context.run(anyio.run, functools.partial(func, *args, **kwargs))
            else:
                result = context.run(func, *args, **kwargs)
        except BaseException as exc:
            settle_failed(future, without_catching_frame(exc))
        else:
            if not is_async and type(result) is types.CoroutineType:
                returned = cast("Coroutine[Any, Any, Any]", result)
                context.run(run_returned_coroutine, future, returned, True)
            else:
                settle(future, result)
    finally:
        # A failure's traceback keeps this frame and fork()'s alive (f_back).
        del future, func, args, kwargs


def _group_for_caller(native: object | None) -> ForkGroup | None:
    """The group a coroutine fork made here joins, or None where no loop runs."""
    group = current_scope_group()
    if group is not None:
        return group
    if native is not None:
        return ambient_group(native)
    token = _loops.worker_thread_token()
    if token is not None:
        return ambient_group(token.native_token, token)
    return None


def _ambient_for(group: ForkGroup) -> ForkGroup:
    return ambient_group(group.token.native_token, group.token)
