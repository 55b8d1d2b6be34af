"""Running a future's done callbacks: in order, each once, whatever they raise, and without
recursion when callbacks complete other futures (a long ``then`` chain).

A callback runs in the thread that completes the future, unless that thread hands its
callbacks off (:data:`callback_hand_off`: the background loop's thread does, since a
callback there could neither block nor wait). Also here: the checks ``add_done_callback``
and ``then`` make of the callables they are given.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from ._callables import is_coroutine_function

__all__ = [
    "callback_hand_off",
    "check_callable",
    "help_pending_dispatch",
    "invoke",
    "run_callbacks",
]

logger = logging.getLogger("anyfork")

# The future whose callbacks run: this module needs nothing of it but to pass it on (and to
# name it in a log), so it imports nothing of ``_future``.
F = TypeVar("F")
# A done callback of some future; the queue below holds those of many futures.
_AnyCallback = Callable[[Any], object]


class _Dispatch(threading.local):
    # Callbacks queued by completions that happened while this thread was already running
    # callbacks. Draining them iteratively (instead of recursing) is what lets a 5000-link
    # ``then`` chain complete without hitting the recursion limit.
    queue: deque[tuple[Any, list[_AnyCallback]]] | None = None


_dispatch = _Dispatch()


def run_callbacks(future: F, callbacks: list[Callable[[F], object]]) -> None:
    """Run a completed future's done callbacks in this thread, in order (see _drain)."""
    queue = _dispatch.queue
    if queue is not None:
        queue.append((future, callbacks))
        return

    queue = _dispatch.queue = deque([(future, callbacks)])
    try:
        _drain(queue)
    finally:
        _dispatch.queue = None


def _drain(queue: deque[tuple[Any, list[_AnyCallback]]]) -> None:
    # Every callback runs, whatever the ones before it raise: a KeyboardInterrupt or
    # SystemExit is raised only once the queue is empty, so no later callback (a then()
    # child, a waiting task's wake-up) is skipped and left pending forever.
    #
    # Each list is emptied as it runs, and nothing is left in this frame's locals: a failing
    # then() callback's traceback keeps this frame, and those that handed the lists in,
    # alive (through f_back), and a callback may hold another future (collect_all's does).
    interrupt: BaseException | None = None
    while queue:
        future, callbacks = queue.popleft()
        callbacks.reverse()
        while callbacks:
            callback = callbacks.pop()
            raised = invoke(callback, future)
            if raised is not None:
                if interrupt is None:
                    interrupt = raised
                else:
                    _log_callback_error(raised, callback, future)
            del callback
        del future, callbacks
    if interrupt is not None:
        try:
            raise interrupt
        finally:
            del interrupt


def help_pending_dispatch() -> None:
    """Run the callbacks queued in this thread before it blocks.

    A callback that blocks on a future further down its own ``then`` chain would otherwise
    wait forever for callbacks that are queued behind it, in its own thread.
    """
    queue = _dispatch.queue
    if queue:
        _drain(queue)


def invoke(callback: Callable[[F], object], future: F) -> BaseException | None:
    """Run one done callback; return the KeyboardInterrupt or SystemExit it raised, if any.

    Anything else it raises is logged, BaseExceptions too (asyncio.CancelledError,
    GeneratorExit): a callback runs in whichever thread or task completes the future, so its
    exception means nothing to that caller. Only an interrupt is handed back, to be raised
    after the other callbacks have run.
    """
    try:
        result = callback(future)
    except (KeyboardInterrupt, SystemExit) as exc:
        return exc
    except BaseException as exc:
        _log_callback_error(exc, callback, future)
    else:
        if type(result) is types.CoroutineType:
            result.close()  # it will never run: spare the user a "never awaited" warning
            logger.error(
                "done callback %r of %r returned a coroutine, which nothing awaits; "
                "it was closed. A callback runs synchronously: pass a sync function",
                callback,
                future,
            )
    return None


def _log_callback_error(exc: BaseException, callback: object, future: object) -> None:
    logger.error("done callback %r of %r raised", callback, future, exc_info=exc)


class _CallbackHandOff(threading.local):
    """Where futures completed in this thread run their done callbacks.

    A thread that must not run user callbacks itself (the background loop's: a callback
    there could neither block nor wait) sets ``runner``. It receives each completed future
    and its callbacks, before the future's blocking waiters wake.
    """

    runner: Callable[[Any, list[_AnyCallback]], None] | None = None


callback_hand_off = _CallbackHandOff()


def _reset_in_child() -> None:
    # A child made by os.fork in the background loop's thread has no such loop.
    callback_hand_off.runner = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_in_child)


def check_callable(callback: object, method: str) -> None:
    if not callable(callback):
        raise TypeError(
            f"{method}() takes a callable that receives the done future, got "
            f"{type(callback).__name__} {callback!r}"
        )
    if is_coroutine_function(callback):
        raise TypeError(
            f"{method}() calls its callback in the thread that completes the future and "
            f"cannot await it, but {callback!r} is a coroutine function. Pass a sync "
            "function, or await the future in a task and call the coroutine function there: "
            "'result = await next_step(await fut)' (or fork such a coroutine function)"
        )
