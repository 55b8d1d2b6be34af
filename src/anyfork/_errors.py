"""The exceptions anyfork raises of its own.

Every type subclasses the closest built-in, so generic handlers keep working, and each one
has a single meaning, so callers can tell them apart from each other and from errors raised
by the forked work itself.
"""

from __future__ import annotations

__all__ = [
    "AlreadyCompletedError",
    "AnyforkError",
    "CancelledError",
    "NotReadyError",
    "ProcessDiedError",
    "RemoteImportError",
    "ShutdownError",
    "WouldBlockError",
]


class AnyforkError(Exception):
    """Base class of every exception defined by anyfork."""


class CancelledError(AnyforkError):
    """Raised when waiting on a future that was cancelled.

    This is an ordinary :class:`Exception`, deliberately *not* the event loop's own
    cancellation exception (``asyncio.CancelledError``, ``trio.Cancelled``): a cancelled
    fork must not look as if the waiting task itself had been cancelled.
    """


class AlreadyCompletedError(AnyforkError, RuntimeError):
    """Raised by ``set_result``/``set_exception`` on a future that is already done."""


class NotReadyError(AnyforkError, RuntimeError):
    """Raised by :meth:`Future.value` while the future is still pending."""


class WouldBlockError(AnyforkError, RuntimeError):
    """Raised by a blocking wait called on an event-loop thread for a pending future
    that the caller cannot run itself (anything but a sync fork that has not started).

    Blocking there would freeze the loop, and with it the very work being waited for.
    """


class ShutdownError(AnyforkError, RuntimeError):
    """Raised by :func:`fork` when the interpreter is shutting down and can no longer run
    new work."""


class ProcessDiedError(AnyforkError, RuntimeError):
    """Raised by waiting on a process fork (:func:`anyfork.process`) whose worker process
    died while running it: a segfault, ``os._exit``, a signal (the out-of-memory killer's
    SIGKILL). Only that fork fails; a fresh worker process takes its place.

    :ivar exitcode: the worker's exit code, negative for the signal that killed it (``-9``
        for SIGKILL), as :attr:`subprocess.Popen.returncode` reports it
    """

    def __init__(self, message: str, exitcode: int) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.exitcode))


class RemoteImportError(ImportError):
    """A cluster's worker (Dask's, Ray's) could not load a forked function or its arguments.

    Public as ``anyfork.dask.RemoteImportError`` and ``anyfork.ray.RemoteImportError``, the
    same class.
    """
