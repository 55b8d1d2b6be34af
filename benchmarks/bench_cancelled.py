"""ns per ``anyfork.cancelled()`` / ``anyfork.check_cancelled()`` call (issue 19).

Usage: ``python benchmarks/bench_cancelled.py`` (in an environment with anyfork installed,
e.g. ``.nox/tests-3-11/bin/python``). Each figure is the best of 7 rounds of 1,000,000 calls,
next to an empty function call for scale: in a sync fork (the case that matters, a torch
generation loop), in a sync fork made by a sync fork (one link to walk), and outside any
fork (library code that checks anywhere).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import anyfork


def per_call(func: Callable[[], object], calls: int = 1_000_000, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            func()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e9


def empty() -> None:
    pass


def measure() -> str:
    figures = [
        (name, per_call(func))
        for name, func in (
            ("empty function", empty),
            ("cancelled()", anyfork.cancelled),
            ("check_cancelled()", anyfork.check_cancelled),
        )
    ]
    return ", ".join(f"{name} {ns:.0f} ns" for name, ns in figures)


def nested() -> str:
    return anyfork.fork(measure).wait()


def main() -> None:
    print(f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"in a sync fork:            {anyfork.fork(measure).wait()}")
    print(f"in a sync fork's own fork: {anyfork.fork(nested).wait()}")
    print(f"outside any fork:          {measure()}")


if __name__ == "__main__":
    main()
