"""The work benchmarks/bench_process.py sends to worker processes, importable by name (a
ProcessPoolExecutor or anyio.to_process worker loads it by module, as pickle does)."""

from __future__ import annotations

import anyfork


def inc(x: int) -> int:
    return x + 1


@anyfork.process
def process_inc(x: int) -> int:
    return x + 1


def spin(n: int) -> int:
    """Pure-Python CPU work: it holds the GIL the whole time."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


@anyfork.process
def process_spin(n: int) -> int:
    return spin(n)


def echo(value: object) -> object:
    return value


@anyfork.process
def process_echo(value: object) -> object:
    return value
