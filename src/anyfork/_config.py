"""The small configuration surface: eager mode, the worker-thread limit, the exit bound."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ._validate import check_count, check_flag, check_seconds

__all__ = ["Config", "configure", "current_config", "on_configure"]

DEFAULT_WORKER_THREADS = 40
DEFAULT_EXIT_TIMEOUT = 60.0
DEFAULT_SLOW_FORK_WARNING = 10.0
DEFAULT_WORKER_IDLE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Config:
    """anyfork's settings, as returned by :func:`anyfork.configure`.

    :ivar eager: run every fork to completion inside :func:`fork`, in the calling thread,
        like ``torch.jit.fork`` outside TorchScript (for debugging and deterministic runs).
        Coroutine functions forked on a running event loop, or in one of its worker threads
        (a sync fork, ``anyio.to_thread.run_sync``, a FastAPI ``def`` endpoint), still
        become tasks on that loop, since objects bound to it would not work under another.
        Environment variable: ``ANYFORK_EAGER=1``.
    :ivar worker_threads: how many sync forks may run at once on anyfork's worker pool (one
        per process, serving every event loop and scripts). anyfork never uses anyio's shared
        default limiter, so sync forks and FastAPI ``def`` endpoints cannot starve each
        other. Environment variable: ``ANYFORK_WORKER_THREADS``.
    :ivar worker_idle_timeout: how many seconds a worker thread with no job waits for one
        before it exits (as anyio's worker threads do, after 10 s); ``None``, or a timeout
        longer than a thread can wait (``math.inf``, anything above
        ``threading.TIMEOUT_MAX``), keeps idle threads for the life of the process, as
        ``ThreadPoolExecutor`` does. Threads start again on demand.
    :ivar process_workers: how many worker processes run process forks
        (:func:`anyfork.process`) at once; ``None`` (the default) for the number of CPU
        cores. They start on demand and retire after ``worker_idle_timeout`` like worker
        threads. Environment variable: ``ANYFORK_PROCESS_WORKERS``.
    :ivar exit_timeout: at interpreter exit, how many seconds anyfork waits in total for
        unfinished forks before it gives up on them: it then logs an ERROR naming each one,
        cancels those that can be cancelled and lets the process exit. ``None`` waits for
        as long as it takes. Environment variable: ``ANYFORK_EXIT_TIMEOUT`` (``none`` for
        no bound).
    :ivar debug: record where each fork is made, name that place in ``repr``, in
        :func:`anyfork.pending` and in "exception was never retrieved" logs, and log a
        WARNING once for each fork pending longer than ``slow_fork_warning`` seconds. It
        costs a few microseconds per fork; off, it costs nothing. Environment variable:
        ``ANYFORK_DEBUG=1``.
    :ivar slow_fork_warning: in debug mode, how many seconds a fork may stay pending
        before a WARNING names it and where it was made.
    """

    eager: bool = False
    worker_threads: int = DEFAULT_WORKER_THREADS
    worker_idle_timeout: float | None = DEFAULT_WORKER_IDLE_TIMEOUT
    process_workers: int | None = None
    exit_timeout: float | None = DEFAULT_EXIT_TIMEOUT
    debug: bool = False
    slow_fork_warning: float = DEFAULT_SLOW_FORK_WARNING


def _from_environment() -> Config:
    # Each variable is checked here, so that its error names the variable that was set
    # rather than the configure() argument it stands for.
    eager_text = os.environ.get("ANYFORK_EAGER", "").strip().lower()
    if eager_text not in ("", "0", "1", "false", "true", "no", "yes"):
        raise ValueError(
            f"ANYFORK_EAGER must be 0 or 1 (or false/true, no/yes), got {eager_text!r}: set it "
            "to one of those, or unset it to keep eager mode off"
        )
    threads_text = os.environ.get("ANYFORK_WORKER_THREADS", "").strip()
    threads = DEFAULT_WORKER_THREADS
    if threads_text:
        try:
            threads = int(threads_text)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(
                f"ANYFORK_WORKER_THREADS must be a whole number >= 1, got {threads_text!r}: "
                f"set it to e.g. 8, or unset it for the default of {DEFAULT_WORKER_THREADS}"
            )
    processes_text = os.environ.get("ANYFORK_PROCESS_WORKERS", "").strip()
    processes: int | None = None
    if processes_text:
        try:
            processes = int(processes_text)
        except ValueError:
            processes = 0
        if processes < 1:
            raise ValueError(
                f"ANYFORK_PROCESS_WORKERS must be a whole number >= 1, got {processes_text!r}: "
                "set it to e.g. 4, or unset it for one worker process per CPU core"
            )
    exit_text = os.environ.get("ANYFORK_EXIT_TIMEOUT", "").strip().lower()
    exit_timeout: float | None = DEFAULT_EXIT_TIMEOUT
    if exit_text == "none":
        exit_timeout = None
    elif exit_text:
        try:
            exit_timeout = float(exit_text)
        except ValueError:
            exit_timeout = -1.0
        if not exit_timeout >= 0:  # negative, or NaN
            raise ValueError(
                f"ANYFORK_EXIT_TIMEOUT must be a number of seconds >= 0 or 'none', got "
                f"{exit_text!r}: set it to e.g. 30, or unset it for the default of "
                f"{DEFAULT_EXIT_TIMEOUT:g} seconds"
            )
    debug_text = os.environ.get("ANYFORK_DEBUG", "").strip().lower()
    if debug_text not in ("", "0", "1", "false", "true", "no", "yes"):
        raise ValueError(
            f"ANYFORK_DEBUG must be 0 or 1 (or false/true, no/yes), got {debug_text!r}: set it "
            "to one of those, or unset it to keep debug mode off"
        )
    return Config(
        eager=eager_text in ("1", "true", "yes"),
        worker_threads=threads,
        process_workers=processes,
        exit_timeout=exit_timeout,
        debug=debug_text in ("1", "true", "yes"),
    )


def _validated(config: Config) -> Config:
    check_flag(config.eager, "eager")
    check_count(config.worker_threads, "worker_threads")
    check_seconds(config.worker_idle_timeout, "worker_idle_timeout", allow_none=True, positive=True)
    if config.process_workers is not None:
        check_count(config.process_workers, "process_workers")
    check_seconds(config.exit_timeout, "exit_timeout", allow_none=True)
    check_flag(config.debug, "debug")
    check_seconds(config.slow_fork_warning, "slow_fork_warning", positive=True)
    return config


_lock = threading.RLock()
_config = _from_environment()
# Called after every configure() that changed a setting: what keeps state derived from the
# settings (the worker pool's thread count) applies a new value at once.
_listeners: list[Callable[[], object]] = []


def current_config() -> Config:
    return _config


def on_configure(listener: Callable[[], object]) -> None:
    """Have ``listener`` called (with no argument) after each change made by configure()."""
    _listeners.append(listener)


_UNSET: Any = object()


def configure(
    *,
    eager: bool | None = None,
    worker_threads: int | None = None,
    worker_idle_timeout: float | None = _UNSET,
    process_workers: int | None = _UNSET,
    exit_timeout: float | None = _UNSET,
    debug: bool | None = None,
    slow_fork_warning: float | None = None,
) -> Config:
    """Change anyfork's settings for the whole process and return the settings now in force.

    Arguments left out keep their value, so ``anyfork.configure()`` just reads them.
    A new worker-thread limit applies at once: raised, it starts threads for the sync forks
    already queued; lowered, idle worker threads above it retire (busy ones when their
    fork is over).

    :param eager: run forks to completion at the call (see :class:`Config`)
    :param worker_threads: the most sync forks running in worker threads at once
    :param worker_idle_timeout: seconds an idle worker thread waits for a job before it
        exits, or ``None`` (or ``math.inf``) to keep idle threads (see :class:`Config`)
    :param process_workers: the most process forks running at once (worker processes),
        or ``None`` for the number of CPU cores
    :param exit_timeout: seconds to wait for unfinished forks at interpreter exit, or
        ``None`` for no bound
    :param debug: record where forks are made and warn about slow ones (see
        :class:`Config`); it applies to forks made from then on
    :param slow_fork_warning: in debug mode, the seconds after which a pending fork is
        named in a WARNING
    :raises TypeError: if a setting has the wrong type: ``eager`` or ``debug`` not a bool,
        ``worker_threads`` or ``process_workers`` not an int, a number of seconds not an
        int or a float (a string or a bool)
    :raises ValueError: if a setting has a wrong value: ``worker_threads`` or
        ``process_workers`` below 1,
        ``worker_idle_timeout`` or ``slow_fork_warning`` not > 0, ``exit_timeout`` negative,
        or a number of seconds NaN

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
        if worker_idle_timeout is not _UNSET:
            changes["worker_idle_timeout"] = worker_idle_timeout
        if process_workers is not _UNSET:
            changes["process_workers"] = process_workers
        if exit_timeout is not _UNSET:
            changes["exit_timeout"] = exit_timeout
        if debug is not None:
            changes["debug"] = debug
        if slow_fork_warning is not None:
            changes["slow_fork_warning"] = slow_fork_warning
        old, _config = _config, _validated(replace(_config, **changes))  # type: ignore[arg-type]
        new = _config
    if new != old:
        for listener in _listeners:
            listener()
    return new
