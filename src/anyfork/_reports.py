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
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from collections import deque

__all__ = ["flush_reports", "report_unretrieved", "start_reporter"]

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
# Set once the flush at exit has run: from then on reports are logged at once.
_at_once = False


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
    thread = threading.Thread(target=_report_forever, name="anyfork reporter", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # the interpreter is exiting: the flush at exit reports
        return
    _reporter = thread


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
    flush_reports()
    _at_once = True
    flush_reports()  # queued between the two


def _reset_in_child() -> None:
    """A child made by ``os.fork`` has no reporter thread: it starts one on its next failure."""
    global _logging, _reporter
    _logging = threading.Lock()
    _reporter = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_in_child)
