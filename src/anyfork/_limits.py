"""``anyfork.Limit``: how many forks under it may run at once, process-wide.

A limit counts *places*. A fork takes one before its work starts and gives it back when
its work is over; the forks that find no free place wait in line, first come first
served, as a :class:`~anyfork.Future` each (a *ticket*), so that waiting holds no thread:
the fork starts from the done callback of its ticket (a sync fork) or its task awaits the
ticket (a coroutine fork). One lock guards the count and the line, so a limit works across
threads and event loops alike.

A holder that blocks gives its place back for as long as it waits, as the worker pool's
managed blocking gives back a thread's slot (``_blocking.py``): a thread holding a place
waits through a :class:`LimitSlot`, a task through a :class:`TaskPlace`. So a fork that
waits inside its limit for another fork of the same limit never deadlocks. Once the wait
is over the holder takes its place back at the head of the line: at most ``total`` forks
under a limit run at any time.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Generator
from typing import Any

import anyio

from ._blocking import Slot
from ._future import Future
from ._state import claim, settle
from ._validate import check_count

__all__ = ["Limit", "LimitSlot", "TaskPlace"]


class Limit:
    """At most ``total`` forks under this limit run at once, in the whole process.

    Share one between callables (``anyfork.options(f, limit=gpu)``,
    ``anyfork.options(g, limit=gpu)``) to bound them together; ``options(f, limit=4)``
    makes a limit of its own for ``f``. Forks beyond ``total`` wait in line, first come
    first served, holding no worker thread and no place in the worker pool; they show as
    ``"queued"`` in :func:`anyfork.pending`. It works across threads and event loops.

    Example::

        gpu = anyfork.Limit(1)

        @anyfork.options(limit=gpu)
        def forward(batch: list[float]) -> list[float]: ...

        gpu.total = 2  # a second GPU came up: one more forward may run at once

    :param total: how many forks may run at once, a whole number >= 1

    .. versionadded:: 0.2
    """

    __slots__ = ("__weakref__", "_line", "_lock", "_running", "_total")

    def __init__(self, total: int) -> None:
        self._total = check_count(total, "total")
        self._lock = threading.Lock()
        self._running = 0
        self._line: deque[Future[None]] = deque()
        _live_limits.add(self)

    def __repr__(self) -> str:
        return (
            f"<anyfork.Limit total={self._total} running={self._running} waiting={len(self._line)}>"
        )

    @property
    def total(self) -> int:
        """How many forks may run at once. Settable at any time, from any thread: raising
        it starts waiting forks at once; lowering it lets running forks finish, and no new
        one starts until fewer than the new total run."""
        return self._total

    @total.setter
    def total(self, total: int) -> None:
        total = check_count(total, "total")
        with self._lock:
            self._total = total
            granted = self._grant()
        _start(granted)

    @property
    def running(self) -> int:
        """How many forks under this limit run now (hold a place)."""
        return self._running

    @property
    def waiting(self) -> int:
        """How many forks wait in line for a place."""
        return len(self._line)

    # --- for the code that runs forks (``_attempts``) ----------------------------------

    def take_or_queue(self) -> Future[None] | None:
        """Take a place now and return ``None``, or return a ticket: a future done once a
        place is taken for its holder (then it must :meth:`release` it)."""
        with self._lock:
            if self._running < self._total and not self._line:
                self._running += 1
                return None
            ticket: Future[None] = Future(name="a place in a limit")
            self._line.append(ticket)
            return ticket

    def leave_line(self, ticket: Future[None]) -> bool:
        """Leave the line (the fork ended while queued); ``False`` if a place was taken for
        the ticket meanwhile: then its holder must :meth:`release` it."""
        if not ticket.cancel():
            return False
        with self._lock:
            try:
                self._line.remove(ticket)
            except ValueError:  # pragma: no cover - taken out by a grant meanwhile
                pass
        return True

    def release(self) -> None:
        """Give a place back; the first in line (if any) takes it."""
        with self._lock:
            if self._running:  # 0 only in a child of os.fork (see _reset_in_child)
                self._running -= 1
            if not self._line:
                return
            granted = self._grant()
        _start(granted)

    def take_back(self) -> Future[None] | None:
        """After a blocking wait: take a place again at the head of the line; ``None`` if
        one is free now, else the ticket to wait for."""
        with self._lock:
            if self._running < self._total:
                self._running += 1
                return None
            ticket: Future[None] = Future(name="a place in a limit")
            self._line.appendleft(ticket)
            return ticket

    def _grant(self) -> list[Future[None]]:
        """Under the lock: take places for the first in line while there are free ones."""
        granted: list[Future[None]] = []
        line = self._line
        while line and self._running < self._total:
            ticket = line.popleft()
            if claim(ticket):  # False: its fork gave up (cancelled the ticket) meanwhile
                self._running += 1
                granted.append(ticket)
        return granted


_live_limits: weakref.WeakSet[Limit] = weakref.WeakSet()


def _reset_in_child() -> None:
    """A child made by ``os.fork`` has none of the parent's threads or pending forks: every
    limit starts empty there (a place the forking thread holds is given back at most to
    zero)."""
    for limit in list(_live_limits):
        limit._lock = threading.Lock()  # pyright: ignore[reportPrivateUsage]
        limit._running = 0  # pyright: ignore[reportPrivateUsage]
        limit._line = deque()  # pyright: ignore[reportPrivateUsage]


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_in_child)


def _start(granted: list[Future[None]]) -> None:
    """Complete the tickets of the forks that got a place, outside the lock (their done
    callbacks start the work)."""
    for ticket in granted:
        settle(ticket, None)


class LimitSlot:
    """The place a thread holds in a limit while it runs a sync fork, as a
    :class:`~anyfork._blocking.Slot` chained before the thread's own (a worker pool slot,
    or another limit's): a blocking wait gives both back and takes both again."""

    __slots__ = ("_limit", "_outer")

    def __init__(self, limit: Limit, outer: Slot | None) -> None:
        self._limit = limit
        self._outer = outer

    def release(self) -> None:
        # The thread's own slot first: a stand-in thread may start for the work that the
        # place given back lets start.
        if self._outer is not None:
            self._outer.release()
        self._limit.release()

    def reacquire(self) -> None:
        # The place first, while the pool still counts this thread as blocked.
        ticket = self._limit.take_back()
        if ticket is not None:
            ticket.wait()  # not a managed wait: this thread holds no slot now
        if self._outer is not None:
            self._outer.reacquire()

    def wait_untimed(self, event: threading.Event) -> bool:
        if self._outer is not None:
            return self._outer.wait_untimed(event)
        return event.wait()


class TaskPlace:
    """The place a coroutine fork's task holds in a limit: an ``await`` of a pending
    future in that task gives it back while it waits (see ``Future._await_pending``)."""

    __slots__ = ("_limit", "_task", "holding")

    def __init__(self, limit: Limit) -> None:
        self._limit = limit
        self._task = anyio.get_current_task().id
        #: Whether the task holds the place now (it gives it back once done).
        self.holding = True

    def leave(self) -> bool:
        """Give the place back if the current task is its holder; whether it did (a fork
        made in the task copies the context that names this place, but holds none)."""
        if not self.holding or anyio.get_current_task().id != self._task:
            return False
        self.holding = False
        self._limit.release()
        return True

    def rejoin(self) -> Generator[Any, Any, None]:
        """Take the place back, at the head of the line (``yield from`` in ``__await__``)."""
        ticket = self._limit.take_back()
        if ticket is not None:
            try:
                yield from ticket.__await__()
            except BaseException:
                if not self._limit.leave_line(ticket):
                    self._limit.release()
                raise
        self.holding = True
