"""The public :class:`Scope`: a structured home for forks that joins them on exit.

A scope owns one fork group (``_groups.py``) on the loop it was entered on. Forks made in
the scope's context — by its body, and by its forks, in tasks and in worker threads alike —
join that group, since forks copy the context. Integrations such as ``anyfork.fastapi``
subclass :class:`Scope` through its extension surface: :meth:`Scope.forks_go_to` (where new
forks go), :meth:`Scope.report_unretrieved` (what happens to failures nobody retrieved),
:attr:`Scope.holds_failures` (whether a long-lived scope holds them at all) and
:meth:`Scope.drain` (a bounded wait for the pending forks).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from contextvars import ContextVar
from types import TracebackType
from typing import Any, NoReturn

import anyio
import anyio.abc

from . import _loops
from ._ambient import ambient_group
from ._config import current_config
from ._debug import PendingFork, describe
from ._future import Future
from ._groups import ForkGroup
from ._state import is_unretrieved_failure, take_unretrieved_error
from ._validate import check_flag, check_seconds

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Scope", "current_scope_group", "scope"]

logger = logging.getLogger("anyfork")

# The innermost open scope of the current context. Forks copy the context, so forks made
# by a scope's forks (in tasks and in worker threads alike) find the same scope.
_current_scope: ContextVar[Scope | None] = ContextVar("anyfork_current_scope", default=None)


def current_scope_group() -> ForkGroup | None:
    """The open fork group that a fork made here joins, if a scope says so; else ``None``
    (the fork goes to the ambient group of its loop, or where no loop runs)."""
    active = _current_scope.get()
    if active is None:
        return None
    target = active.forks_go_to()
    group = None if target is None else target._group  # pyright: ignore[reportPrivateUsage]
    if group is None or group.closed:
        return None
    return group


class Scope:
    """A structured home for forks; create it with :func:`anyfork.scope`.

    Forks made inside ``async with anyfork.scope():`` — including forks made by those forks,
    in tasks and in worker threads — belong to the scope. On exit the scope waits for all of
    them to finish, then raises an :class:`ExceptionGroup` of the failures nobody retrieved.
    A failing fork cancels neither its siblings nor the body. Cancelling the task that runs
    the scope cancels its forks (sync forks already running in a worker thread cannot be
    stopped: the scope still waits for them).
    """

    def __init__(self, *, cancel_pending: bool = False) -> None:
        """
        :param cancel_pending: on exit, cancel the forks still pending instead of waiting
            for them (sync forks already running in a thread are still waited for)
        """
        self.cancel_pending = check_flag(cancel_pending, "cancel_pending")
        self._group: _ScopeGroup | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._context_token: Any = None

    def __repr__(self) -> str:
        return f"<anyfork.Scope pending={len(self.pending)}>"

    @property
    def pending(self) -> list[PendingFork]:
        """The forks of this scope that have not finished yet, oldest first, described as
        :func:`anyfork.pending` describes them (a snapshot)."""
        return [] if self._group is None else describe(self._group.pending_futures())

    @property
    def closed(self) -> bool:
        """Whether the scope takes no more forks (it is exiting, or has exited)."""
        return self._group is not None and self._group.closed

    def cancel(self) -> None:
        """Cancel every fork of this scope that is still pending."""
        if self._group is not None:
            for future in self._group.pending_futures():
                future.cancel()

    # --- the extension surface (for integrations that subclass Scope) -------------------

    #: Whether the scope holds its forks' failures until it exits, to report those nobody
    #: retrieved by then (:meth:`report_unretrieved`). A long-lived scope (an app's) sets
    #: it to ``False``: it then holds none, a failed fork that nobody holds or retrieved is
    #: reported ("exception ... was never retrieved") as soon as it is freed, and only the
    #: failures still referenced elsewhere at exit reach :meth:`report_unretrieved`.
    #: Either way a failure that was retrieved is forgotten.
    holds_failures: bool = True

    def forks_go_to(self) -> Scope | None:
        """Where forks made in this scope go: this scope (the default), another open scope,
        or ``None`` for the ambient group of the loop.

        A scope that is not open (not entered yet, or closed) sends them to the ambient
        group too.
        """
        return self

    def report_unretrieved(self, failures: list[BaseException], exc: BaseException | None) -> None:
        """Report, on exit, the failures of forks that nobody retrieved.

        The default raises them together, with the body's exception ``exc`` first, as an
        :class:`ExceptionGroup` (a :class:`BaseExceptionGroup` if one is not an
        :class:`Exception`). A subclass may log them instead.
        """
        errors: list[BaseException] = [] if exc is None else [exc]
        errors.extend(failures)
        raise BaseExceptionGroup("failures of forks in an anyfork scope", errors)

    async def drain(self, timeout: float) -> list[Future[Any]]:
        """Wait up to ``timeout`` seconds for the pending forks; return those still pending.

        It cancels nothing: the caller decides what to do with the rest (``cancel()``, or
        ``cancel_pending = True`` before exiting).

        :raises TypeError: if ``timeout`` is not a number (a string, a bool)
        :raises ValueError: if ``timeout`` is negative or NaN
        """
        check_seconds(timeout, "timeout")
        if self._group is None:
            return []
        with anyio.move_on_after(timeout):
            await self._group.wait_idle()
        return self._group.pending_futures()

    # --- entering and exiting -----------------------------------------------------------

    def __enter__(self) -> NoReturn:
        raise TypeError(
            "anyfork.scope() is an async context manager: use 'async with anyfork.scope():' "
            "inside a coroutine (a script needs no scope: its forks are joined at exit)"
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ raises
        pass

    async def __aenter__(self) -> Scope:
        if self._group is not None:
            raise RuntimeError("an anyfork.Scope can be entered only once; create a new one")
        native = _loops.running_native_loop()
        if native is None:  # pragma: no cover - only reachable by driving __aenter__ by hand
            raise RuntimeError("anyfork.scope() must be entered in async code")
        self._group = _ScopeGroup(
            ambient_group(native).token,
            threading.get_ident(),
            hold_failures=self.holds_failures,
        )
        # Opened now even if the body forks no coroutine: a coroutine fork may join at any
        # time (from inside a cancel scope of the body, or from another task or thread) and
        # its task must start at once, in a task group that only this task can open, here.
        # Entering and exiting it (its exit is a checkpoint) is most of a scope's cost.
        self._task_group = anyio.create_task_group()
        self._group.open(await self._task_group.__aenter__())
        self._context_token = _current_scope.set(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._group is not None
        assert self._task_group is not None
        _current_scope.reset(self._context_token)
        group = self._group
        if self.cancel_pending:
            self.cancel()
        try:
            # Forks the body awaited are done by now: close without making a coroutine.
            if not group.close_if_idle():
                await _join(group)
        except BaseException as join_exc:
            # The task running the scope was cancelled while joining: cancel the forks too.
            for future in group.close_now():
                future.cancel()
            try:
                await self._task_group.__aexit__(type(join_exc), join_exc, join_exc.__traceback__)
            finally:
                # Sync forks already running in worker threads cannot be stopped: the
                # scope still ends after them, as a task ends after its to_thread.run_sync.
                with anyio.CancelScope(shield=True):
                    await group.wait_idle()
            raise
        if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
            await self._task_group.__aexit__(exc_type, exc, traceback)
        else:
            # Every fork has finished, so there is nothing left to cancel; passing the
            # body's exception on would only make anyio wrap it in an ExceptionGroup.
            await self._task_group.__aexit__(None, None, None)

        failures = group.take_unretrieved_failures()
        if failures:
            self.report_unretrieved(failures, exc)


async def _join(group: ForkGroup) -> None:
    """Wait until the scope's forks are done, then close the group. In debug mode, a wait
    longer than ``slow_fork_warning`` is logged once, naming the forks it waits for: a fork
    that waits for something only the body would have done (the body failed first) would
    otherwise hang the scope's exit without a word."""
    config = current_config()
    if config.debug:
        started = time.monotonic()
        with anyio.move_on_after(config.slow_fork_warning):
            await group.wait_idle(close=True)
        if group.closed:
            return
        waited_for = describe(group.pending_futures())
        logger.warning(
            "a scope has been waiting %.1f seconds at its exit for %d fork(s); "
            "does one of them wait for something the body would have done? %s",
            time.monotonic() - started,
            len(waited_for),
            "; ".join(
                f"{fork.future!r} ({fork.kind}, {fork.state}, forked at "
                f"{fork.forked_at or 'an unknown place'})"
                for fork in waited_for
            ),
        )
        del waited_for
    await group.wait_idle(close=True)


class _ScopeGroup(ForkGroup):
    """A scope's fork group: it also remembers which of its forks failed, until their
    failure is retrieved (or, with ``hold_failures=False``, while they live)."""

    _failed: list[Future[Any]] | weakref.WeakSet[Future[Any]]

    def __init__(self, token: Any, loop_thread: int, *, hold_failures: bool = True) -> None:
        super().__init__(token, loop_thread)
        self._hold_failures = hold_failures
        # How many failures were held after the last pruning (see _note_failed).
        self._kept = 0

    def open(self, task_group: anyio.abc.TaskGroup) -> None:
        self._failed = [] if self._hold_failures else weakref.WeakSet()
        super().open(task_group)

    def _note_failed(self, future: Future[Any]) -> None:
        # Under the lock: sync forks fail in worker threads.
        with self._lock:
            failed = self._failed
            if isinstance(failed, weakref.WeakSet):
                failed.add(future)
                return
            failed.append(future)
            # Forget the failures retrieved meanwhile (a long-lived scope whose failures are
            # all handled must not keep them, and their frames, until it exits). Pruned when
            # the list has doubled, so a failure costs O(1) on average.
            if len(failed) >= max(_PRUNE_AT, 2 * self._kept):
                failed[:] = [future for future in failed if is_unretrieved_failure(future)]
                self._kept = len(failed)

    def close_if_idle(self) -> bool:
        """Close the group if no fork is pending; return whether it did.

        The synchronous half of ``wait_idle(close=True)``, for a scope's exit, where the
        forks have usually finished already.
        """
        with self._lock:
            if self._pending:
                return False
            self._closed = True
            return True

    def take_unretrieved_failures(self) -> list[BaseException]:
        with self._lock:
            failed = list(self._failed)
            self._failed.clear()
        errors = [take_unretrieved_error(future) for future in failed]
        del failed
        return [error for error in errors if error is not None]


# The fewest failures a scope holds before it forgets the retrieved ones.
_PRUNE_AT = 32


def scope(*, cancel_pending: bool = False) -> Scope:
    """Open a structured scope for forks: ``async with anyfork.scope(): ...``.

    :param cancel_pending: on exit, cancel the forks still pending instead of waiting for
        them to finish

    Example::

        async with anyfork.scope():
            user = anyfork.fork(fetch_user, 42)
            anyfork.fork(write_audit_log, "viewed", 42)  # finishes before the scope exits
            print(await user)
    """
    return Scope(cancel_pending=cancel_pending)
