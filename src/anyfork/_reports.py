"""Reports of failures nobody retrieved, made at a safe point, never inside the garbage
collector.

A failed future that nobody read is reported (``exception of ... was never retrieved``)
once it is freed, and freeing often happens inside the garbage collector, which runs
wherever an allocation triggers it: in the middle of ``ast.parse``, or of a logging handler
holding its lock. Formatting a traceback there (which reads source lines and, on Python
3.11+, parses them) can break the code the collector interrupted. So a finalizer only
queues its report, which costs two reentrant operations, and the **reporter thread** logs
it, usually within milliseconds. At interpreter exit the queue is flushed (an ``atexit``
hook, which runs after the exit join and before logging shuts down), and a report queued
after that is logged at once.

Free-threaded CPython 3.13 makes modules immortal (CPython gh-117783): at exit it sets
anyfork's module globals, and logging's, to None before those of ``__main__``, so a failed
future that a global of ``__main__`` holds is finalized with nothing left to report it.
There the flush at exit also reports the failed futures still alive and unread, and counts
them as retrieved (their finalizers report nothing more).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import sysconfig
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["flush_reports", "report_unretrieved", "start_reporter", "watch_until_exit"]

logger = logging.getLogger("anyfork")

# (the future's repr, its exception): a repr, not the future, since a handler that keeps
# records (pytest's caplog, a memory handler) would otherwise bring the future back to life.
_Report = tuple[str, BaseException]

# deque.append and SimpleQueue.put are reentrant: safe to call from a finalizer, even one
# the collector runs in the middle of the same call in the same thread.
_reports: deque[_Report] = deque()
_wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
# Held while reports are logged: the flush at exit waits for the reporter thread's round.
_logging = threading.Lock()
_reporter: threading.Thread | None = None
# Held by the one thread starting the reporter: failures stored in several threads at once
# (a burst's first ones) would each see no reporter yet and start one, and every extra
# reporter thread lived for the rest of the process.
_starting = threading.Lock()
# Set once the flush at exit has run: from then on reports are logged at once.
_at_once = False
# Where finalizers run too late at exit (see above): the failed futures alive, by id
# (dict operations are atomic without the GIL too), and how to take their reports.
_LATE_FINALIZERS = bool(sysconfig.get_config_var("Py_GIL_DISABLED")) and sys.version_info < (3, 14)
_alive: dict[int, weakref.ref[Any]] = {}
_take: Callable[[Any], _Report | None] | None = None


def report_unretrieved(label: str, exception: BaseException) -> None:
    """Report that ``exception``, of the future ``label`` (its repr), was never retrieved.

    Safe inside a finalizer and inside the garbage collector: it only queues the report.
    """
    if _at_once:
        _log(label, exception)
        return
    _reports.append((label, exception))
    _wakeups.put(None)


def start_reporter() -> None:
    """Make sure the reporter thread runs (called where a failure is stored, never from a
    finalizer: starting a thread is not safe inside the collector)."""
    global _reporter
    if _reporter is not None or _at_once:
        return
    # Not blocking: a thread that finds it held returns, since the holder starts the one
    # reporter (which then logs this thread's reports too); so does a signal handler that
    # interrupted the holder in this thread, which must not wait for it.
    if not _starting.acquire(blocking=False):
        return
    try:
        if _reporter is not None:  # started while this thread was on its way here
            return
        thread = threading.Thread(target=_report_forever, name="anyfork reporter", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the interpreter is exiting: the flush at exit reports
            return
        _reporter = thread
    finally:
        _starting.release()


def watch_until_exit(future: object, take: Callable[[Any], _Report | None]) -> None:
    """Report the failed ``future`` at exit if it is still alive and unread then, where its
    finalizer would run too late (free-threaded 3.13); ``take(future)`` returns its report
    and counts its error as retrieved, or returns ``None``. A no-op elsewhere."""
    global _take
    if not _LATE_FINALIZERS or _at_once:
        return
    _take = take
    key = id(future)
    _alive[key] = weakref.ref(future, _forget(key))


def _forget(key: int) -> Callable[[weakref.ref[Any]], None]:
    # Binds what it needs: the callback may run after this module's globals are gone.
    pop = _alive.pop

    def forget(_ref: weakref.ref[Any]) -> None:
        pop(key, None)

    return forget


def flush_reports() -> None:
    """Log every queued report now, in this thread (after the reporter's current round)."""
    # Bounded: a handler stuck in the reporter thread must not hang the exit.
    if not _logging.acquire(timeout=5):  # pragma: no cover - a handler blocked for seconds
        return
    try:
        while _reports:
            try:
                label, exception = _reports.popleft()
            except IndexError:  # pragma: no cover - emptied meanwhile
                return
            _log(label, exception)
            del exception
    finally:
        _logging.release()


def _report_forever() -> None:
    while True:
        _wakeups.get()
        flush_reports()


def _log(label: str, exception: BaseException) -> None:
    try:
        logger.error("exception of %s was never retrieved", label, exc_info=exception)
    except Exception:  # pragma: no cover - logging torn down at interpreter exit
        pass


@atexit.register
def _flush_at_exit() -> None:
    global _at_once
    take = _take
    if take is not None:
        for ref in list(_alive.values()):
            future = ref()
            if future is not None and (report := take(future)) is not None:
                _reports.append(report)
            del future
    flush_reports()
    _at_once = True
    flush_reports()  # queued between the two


def _reset_in_child() -> None:
    """A child made by ``os.fork`` has no reporter thread: it starts one on its next failure."""
    global _logging, _reporter, _starting
    _logging = threading.Lock()
    _reporter = None
    _starting = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_in_child)
