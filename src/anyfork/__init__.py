"""anyfork: PyTorch's fork/wait model for async Python, on anyio.

``fork(func, *args, **kwargs)`` starts work and returns a :class:`Future` at once; ``wait``
blocks for its value and ``await`` waits without blocking. Coroutine functions run as anyio
tasks, sync callables in worker threads, and plain scripts work without any event loop.
"""

from __future__ import annotations

from ._as_completed import AsCompleted, as_completed
from ._cancel import cancelled, check_cancelled
from ._config import Config, configure
from ._debug import PendingFork, pending
from ._errors import (
    AlreadyCompletedError,
    AnyforkError,
    CancelledError,
    NotReadyError,
    ProcessDiedError,
    ShutdownError,
    WouldBlockError,
)
from ._fork import fork
from ._future import Future
from ._limits import Limit
from ._map import MapIterator, map
from ._options import options
from ._process import ProcessFunction, process
from ._scope import Scope, scope
from ._wait import collect_all, wait, wait_all, wait_async

__all__ = [
    "AlreadyCompletedError",
    "AnyforkError",
    "AsCompleted",
    "CancelledError",
    "Config",
    "Future",
    "Limit",
    "MapIterator",
    "NotReadyError",
    "PendingFork",
    "ProcessDiedError",
    "ProcessFunction",
    "Scope",
    "ShutdownError",
    "WouldBlockError",
    "as_completed",
    "cancelled",
    "check_cancelled",
    "collect_all",
    "configure",
    "fork",
    "map",
    "options",
    "pending",
    "process",
    "scope",
    "wait",
    "wait_all",
    "wait_async",
]

__version__ = "0.1.0"
