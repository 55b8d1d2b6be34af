"""The small configuration surface: eager mode and the worker-thread limit."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

__all__ = ["Config", "configure", "current_config"]

DEFAULT_WORKER_THREADS = 40


@dataclass(frozen=True)
class Config:
    """anyfork's settings, as returned by :func:`anyfork.configure`.

    :ivar eager: run every fork to completion inside :func:`fork`, in the calling thread,
        like ``torch.jit.fork`` outside TorchScript (for debugging and deterministic runs).
        Coroutine functions forked on a running event loop still become tasks, since they
        cannot finish without that loop. Environment variable: ``ANYFORK_EAGER=1``.
    :ivar worker_threads: how many sync forks may run in worker threads at once, per event
        loop and in the script fallback's thread pool. anyfork never uses anyio's shared
        default limiter, so sync forks and FastAPI ``def`` endpoints cannot starve each
        other. Environment variable: ``ANYFORK_WORKER_THREADS``.
    """

    eager: bool = False
    worker_threads: int = DEFAULT_WORKER_THREADS


def _from_environment() -> Config:
    eager_text = os.environ.get("ANYFORK_EAGER", "").strip().lower()
    if eager_text not in ("", "0", "1", "false", "true", "no", "yes"):
        raise ValueError(f"ANYFORK_EAGER must be 0 or 1, got {eager_text!r}")
    threads_text = os.environ.get("ANYFORK_WORKER_THREADS", "").strip()
    try:
        threads = int(threads_text) if threads_text else DEFAULT_WORKER_THREADS
    except ValueError:
        raise ValueError(
            f"ANYFORK_WORKER_THREADS must be a whole number >= 1, got {threads_text!r}"
        ) from None
    return _validated(Config(eager=eager_text in ("1", "true", "yes"), worker_threads=threads))


def _validated(config: Config) -> Config:
    if not isinstance(config.eager, bool):
        raise TypeError(f"eager must be True or False, got {config.eager!r}")
    threads = config.worker_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"worker_threads must be a whole number >= 1, got {threads!r}")
    return config


_lock = threading.Lock()
_config = _from_environment()


def current_config() -> Config:
    return _config


def configure(*, eager: bool | None = None, worker_threads: int | None = None) -> Config:
    """Change anyfork's settings for the whole process and return the settings now in force.

    Arguments left as ``None`` keep their value, so ``anyfork.configure()`` just reads them.
    A new worker-thread limit applies to event loops and thread pools that anyfork sets up
    afterwards; configure it at start-up, before the first fork.

    :param eager: run forks to completion at the call (see :class:`Config`)
    :param worker_threads: the most sync forks running in worker threads at once
    :raises ValueError: if ``worker_threads`` is not a whole number >= 1
    :raises TypeError: if ``eager`` is not a bool

    Example::

        anyfork.configure(worker_threads=8)
    """
    global _config
    with _lock:
        changes: dict[str, object] = {}
        if eager is not None:
            changes["eager"] = eager
        if worker_threads is not None:
            changes["worker_threads"] = worker_threads
        _config = _validated(replace(_config, **changes))  # type: ignore[arg-type]
        return _config
