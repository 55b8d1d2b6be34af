"""The machinery of :meth:`Future.then`: a done callback that completes another future.

A ``then`` step is a small runner, like the places forks run in: its :class:`ThenCallback`
is the child future's :class:`~anyfork._state.Work`, and it claims and settles the child
through ``_state.py``'s internal API, as they do.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from ._state import (
    FutureState,
    Work,
    claim,
    restore_traceback,
    settle,
    settle_failed,
    without_catching_frame,
)

__all__ = ["ThenCallback"]

S = TypeVar("S")

logger = logging.getLogger("anyfork")


class ThenCallback(Work, Generic[S]):
    """The done callback of :meth:`Future.then`: completes ``child`` with ``callback(parent)``.

    It is also the child's :class:`Work`: cancelling the child before the callback starts
    drops the callback, which then never runs; once it runs, ``cancel()`` returns ``False``
    (the callback, like a sync fork in a thread, cannot be stopped). It runs once and lets
    go of both at the start: the frames that dispatched it may outlive the call in a
    traceback (see :func:`without_catching_frame`), and must not hold the child.
    """

    __slots__ = ("_callback", "_child")

    def __init__(self, callback: Callable[[Any], S], child: FutureState[S]) -> None:
        self._callback: Callable[[Any], S] | None = callback
        self._child: FutureState[S] | None = child

    kind = "then() callback"

    def cancel(self, future: Any) -> None:
        # The child was cancelled before its callback started: it never will.
        self._callback = self._child = None

    def __call__(self, parent: FutureState[Any]) -> None:
        callback, child = self._callback, self._child
        if callback is None or child is None:  # cancelled, or already run
            return
        self._callback = self._child = None
        try:
            if not claim(child):  # cancelled (or completed by hand) meanwhile
                return
            try:
                result = callback(parent)
            except BaseException as exc:
                # The callback re-raised its parent's error (lambda f: f.value()): keep the
                # parent's traceback, so a long failing chain does not grow it.
                if not restore_traceback(parent, exc):
                    without_catching_frame(exc)
                if not settle_failed(child, exc):
                    _log_lost_error(child, callback, exc)
            else:
                if isinstance(result, types.CoroutineType):
                    # It will never run: spare the user a "never awaited" warning.
                    cast("types.CoroutineType[Any, Any, Any]", result).close()
                    settle_failed(
                        child,
                        TypeError(
                            f"the then() callback {callback!r} returned a coroutine, which "
                            "nothing awaits (it was closed): then() calls its callback "
                            "synchronously; pass a sync function, or await the future in a "
                            "task and call the coroutine function there"
                        ),
                    )
                else:
                    settle(child, result)
        finally:
            del child, callback


def _log_lost_error(child: FutureState[Any], callback: object, exc: BaseException) -> None:
    """A then() callback raised after its child was completed by other means: the error
    cannot be stored, so it is logged rather than lost."""
    logger.error(
        "the then() callback %r raised, but its future %r was already done "
        "(completed by hand while the callback ran)",
        callback,
        child,
        exc_info=exc,
    )
