"""Asking a running sync fork to stop.

A sync fork already running in a worker thread cannot be interrupted; it can only be asked
to stop, and see the request when it next checks. This module owns that request: whoever
decides a running fork should stop (``Future.cancel``, a scope's cancel, a deadline) calls
:func:`request_stop`; the work sees it through ``check_cancelled()``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from ._future import Future

__all__ = ["request_stop", "stop_requested"]

_lock = threading.Lock()
_asked: weakref.WeakSet[Future[Any]] = weakref.WeakSet()


def request_stop(future: Future[Any]) -> None:
    """Ask the work behind ``future`` to stop, if it is a running sync fork; it sees the
    request the next time it checks. Never blocks; harmless on any other future."""
    with _lock:
        _asked.add(future)


def stop_requested(future: Future[Any]) -> bool:
    """Whether the work behind ``future`` has been asked to stop."""
    with _lock:
        return future in _asked
