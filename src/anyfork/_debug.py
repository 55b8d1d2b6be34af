"""Seeing what forks are doing: :func:`pending` and debug mode.

:func:`pending` lists the forks still pending in this process, from the two places that
know them: the exit join (every sync fork, and the background loop's forks) and the fork
groups (coroutine forks on every loop, in scopes or ambient groups).

Debug mode (``anyfork.configure(debug=True)``, ``ANYFORK_DEBUG=1``) records where each fork
is made, and a watchdog thread logs a WARNING once for each fork pending longer than
``slow_fork_warning`` seconds, naming that place.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ._config import current_config
from ._exit import exit_join
from ._future import Future
from ._groups import live_groups
from ._state import fork_record, keep_fork_record

__all__ = [
    "AttemptsView",
    "PendingFork",
    "fork_site",
    "note_forked",
    "pending",
    "show_attempts",
    "watch_slow_forks",
]

logger = logging.getLogger("anyfork")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def note_forked(future: Future[Any], site: str | None) -> None:
    """Record that ``future`` is a fork's, made now at ``site`` (debug mode, else None)."""
    keep_fork_record(future, (time.monotonic(), site))


@dataclass(frozen=True)
class PendingFork:
    """A fork that has not finished yet, as :func:`anyfork.pending` reports it."""

    #: The fork's future.
    future: Future[Any]
    #: The fork's name (its function's qualified name).
    name: str
    #: ``"task"`` for a coroutine fork, ``"worker thread"`` for a sync fork, ``"process"``
    #: for a process fork (``anyfork.process``), ``"remote"`` for a fork sent to a cluster
    #: (``anyfork.dask``).
    kind: str
    #: ``"queued"`` until its work starts, then ``"running"``.
    state: Literal["queued", "running"]
    #: Seconds since it was forked.
    age: float
    #: Where it was forked (``file:line in function``), in debug mode; else ``None``.
    forked_at: str | None
    #: Which attempt runs (or ran last), 1 for the first; more only for a fork retried by
    #: :func:`anyfork.options` (``retries``). 0 for a fork queued in its limit.
    attempt: int = 1


class AttemptsView(Protocol):
    """What an options-wrapped fork shows of its attempts (``_attempts``)."""

    @property
    def attempt(self) -> int: ...

    @property
    def queued(self) -> bool: ...


# The options-wrapped forks pending now, and their attempts.
_attempts: weakref.WeakKeyDictionary[Future[Any], AttemptsView] = weakref.WeakKeyDictionary()


def show_attempts(future: Future[Any], view: AttemptsView) -> None:
    """Have :func:`pending` show the attempts of ``future`` (an options-wrapped fork)."""
    _attempts[future] = view


def pending() -> list[PendingFork]:
    """Return the forks of this process that have not finished yet, oldest first.

    Each entry says what the fork is, whether its work has started and how long ago it was
    forked, and, in debug mode, where. It is a snapshot: cheap enough for a health
    endpoint (about a microsecond per pending fork), and forks may finish while you read
    it. Scopes list their own with :attr:`Scope.pending`.

    Example::

        stuck = [fork for fork in anyfork.pending() if fork.age > 30]
    """
    futures = exit_join.tracked()
    for group in live_groups():
        futures.extend(group.pending_futures())
    return describe(futures)


def describe(futures: list[Future[Any]]) -> list[PendingFork]:
    """Describe the pending forks among ``futures`` (once each), oldest first."""
    now = time.monotonic()
    seen: set[int] = set()
    records: list[PendingFork] = []
    for future in futures:
        record = fork_record(future)
        if record is None or id(future) in seen:
            continue
        seen.add(id(future))
        (forked_at, site), work = record
        state = "queued" if work is None else work.state(future)
        attempt = 1
        view = _attempts.get(future) if _attempts else None
        if view is not None:
            attempt = abs(view.attempt)
            if view.queued:
                state = "queued"
        records.append(
            PendingFork(
                future=future,
                name=future.name or "",
                kind="work" if work is None else work.kind,
                state="running" if state == "running" else "queued",
                age=max(now - forked_at, 0.0),
                forked_at=site,
                attempt=attempt,
            )
        )
    records.sort(key=lambda record: -record.age)
    return records


def fork_site() -> str:
    """Where the code that called ``fork`` is: the first frame outside anyfork."""
    frame = sys._getframe(1)  # pyright: ignore[reportPrivateUsage]
    while frame.f_back is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
        frame = frame.f_back
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


class _Watchdog:
    """A daemon thread that, in debug mode, warns once about each fork pending too long."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned: weakref.WeakSet[Future[Any]] = weakref.WeakSet()

    def ensure_running(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            thread = threading.Thread(target=self._watch, name="anyfork watchdog", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # the interpreter is exiting: nothing left to watch for
                return
            self._thread = thread

    def _watch(self) -> None:
        while True:
            config = current_config()
            if not config.debug:
                with self._lock:
                    self._thread = None
                return
            threshold = config.slow_fork_warning
            for record in pending():
                if record.age < threshold:
                    break  # oldest first: the rest are younger
                if record.future in self._warned:
                    continue
                self._warned.add(record.future)
                logger.warning(
                    "fork %r has been pending for %.1f seconds (%s, %s%s); it was forked at %s",
                    record.future,
                    record.age,
                    record.kind,
                    record.state,
                    f", attempt {record.attempt}" if record.attempt > 1 else "",
                    record.forked_at or "an unknown place (forked before debug mode was on)",
                )
                del record
            time.sleep(min(1.0, threshold / 4))

    def reset_in_child(self) -> None:
        self._lock = threading.Lock()
        self._thread = None


_watchdog = _Watchdog()


def watch_slow_forks() -> None:
    """Start the watchdog of slow forks if it is not running (debug mode)."""
    _watchdog.ensure_running()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_watchdog.reset_in_child)
