"""The deadlines of options-wrapped sync and remote forks: one daemon thread for the
process that calls each fork's ``expire`` at its deadline (``_attempts``). Coroutine forks
need none: their task runs in a cancel scope with the deadline."""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Deadlines", "deadlines"]

logger = logging.getLogger("anyfork")


class Deadlines:
    """One daemon thread that calls each sync fork's ``expire`` at its deadline."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._heap: list[list[Any]] = []
        self._count = 0
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, expire: Callable[[], None]) -> list[Any]:
        entry: list[Any] = [deadline, 0, expire]
        with self._condition:
            self._count += 1
            entry[1] = self._count
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._condition.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="anyfork-deadlines", daemon=True
                )
                self._thread.start()
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        entry[2] = None  # dropped when its time comes; lets go of the fork now

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    now = time.monotonic()
                    heap = self._heap
                    while heap and heap[0][2] is None:
                        heapq.heappop(heap)
                    if heap and heap[0][0] <= now:
                        expire = heapq.heappop(heap)[2]
                        break
                    self._condition.wait(None if not heap else heap[0][0] - now)
            try:
                expire()
            except BaseException:  # pragma: no cover - expire only settles and cancels
                logger.exception("a fork's deadline could not be applied")
            del expire

    def reset_in_child(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._heap = []
        self._thread = None


deadlines = Deadlines()

if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=deadlines.reset_in_child)
