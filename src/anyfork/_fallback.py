"""Forks made where no event loop runs: plain scripts and threads anyio did not start.

Sync callables go to a thread pool; coroutine functions go to one background event loop
per process, started on first use through anyio's ``BlockingPortal``. Both are set up
lazily, so a program that never forks outside a loop pays nothing.

At interpreter exit every unfinished fork is joined, so no work is lost. The join runs as
a ``threading`` at-exit hook, which Python calls *before* it joins non-daemon threads and
before ``concurrent.futures`` stops accepting work, so forks made by forks during the join
still run. Then the background loop and the pool shut down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import anyio.from_thread
import anyio.lowlevel

from ._config import current_config
from ._errors import ShutdownError
from ._future import Future
from ._scope import _AmbientGroup, ambient_group, exit_join_started

__all__ = ["fallback"]

logger = logging.getLogger("anyfork")


class _Fallback:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._loop_group: _AmbientGroup | None = None
        self._pending: set[Future[Any]] = set()
        self._exit_hook_registered = False
        self._shut_down = False

    def _check_open(self) -> None:
        if self._shut_down:
            raise ShutdownError(
                "anyfork cannot start new work: the interpreter is shutting down. Fork "
                "before the end of the script, or wait for the fork inside the work that "
                "makes it."
            )
        if not self._exit_hook_registered:
            # Runs before threads are joined at exit, unlike atexit.register.
            threading._register_atexit(self.join_at_exit)  # type: ignore[attr-defined]
            self._exit_hook_registered = True

    def submit_sync(self, future: Future[Any], job: Callable[[], None]) -> None:
        """Run ``job`` in the pool; the job completes ``future`` itself."""
        with self._lock:
            self._check_open()
            executor = self._executor
            if executor is None:
                executor = self._executor = ThreadPoolExecutor(
                    max_workers=current_config().worker_threads,
                    thread_name_prefix="anyfork-worker",
                )
            self._pending.add(future)
        future.add_done_callback(self._discard)
        try:
            executor.submit(job)
        except RuntimeError:
            # Python 3.12+ refuses new threads once the interpreter is exiting. The job is
            # queued all the same: an idle worker, or the exit join stealing it, runs it.
            pass

    def _discard(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def loop_group(self) -> _AmbientGroup:
        """Return the ambient group of the background loop, starting the loop if needed."""
        with self._lock:
            self._check_open()
            if self._loop_group is None:
                portal_cm = anyio.from_thread.start_blocking_portal(
                    "asyncio", name="anyfork background loop"
                )
                portal = portal_cm.__enter__()
                token = portal.call(anyio.lowlevel.current_token)
                self._portal_cm = portal_cm
                self._loop_group = ambient_group(token.native_token, token)
            return self._loop_group

    def _unfinished(self) -> list[Future[Any]]:
        with self._lock:
            unfinished = list(self._pending)
            if self._loop_group is not None:
                unfinished.extend(self._loop_group.pending_futures())
        return [future for future in unfinished if not future.done()]

    def join_at_exit(self) -> None:
        """Wait for every unfinished fork, then shut the background loop and pool down."""
        exit_join_started.set()
        try:
            while unfinished := self._unfinished():
                for future in unfinished:
                    # Only wait: reading the outcome would hide a failure nobody retrieved.
                    future._block_until_done(None)
        except KeyboardInterrupt:
            logger.warning(
                "anyfork: interrupted while waiting for forks at exit; cancelling %d of them",
                len(self._unfinished()),
            )
            for future in self._unfinished():
                future.cancel()
        finally:
            with self._lock:
                self._shut_down = True
                portal_cm, self._portal_cm = self._portal_cm, None
                executor, self._executor = self._executor, None
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


fallback = _Fallback()
