"""µs per item of ``anyfork.map`` against what people use instead, measured in one run.

Usage: ``nox -s bench_map [-- --quick]`` (or ``python benchmarks/bench_map.py [--quick]``).

- sync callable, in a script: ``anyfork.map(f, items)`` (ordered, at most
  ``worker_threads`` in flight, its default) against ``ThreadPoolExecutor.map`` with as many
  threads (plain: it submits every item at the call; ``buffersize`` is 3.14's);
- coroutine function, on a loop (asyncio, then trio): ``async for`` over
  ``anyfork.map(f, items, limit=LIMIT)`` against an anyio task group that starts one task
  per item, each entering a ``CapacityLimiter(LIMIT)`` (the results gathered into a list).

Every contender maps the same cheap function over 10,000 items and sums the results. The
contenders of a case take turns, round after round, the order rotated each round; a figure
is the median over rounds. Ratio = anyfork / alternative: below 1.00, anyfork is faster.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anyio

import anyfork

QUICK = "--quick" in sys.argv
ROUNDS = 5 if QUICK else 11
ITEMS = 10_000
LIMIT = 100  # coroutine items in flight, for both contenders
THREADS = anyfork.configure().worker_threads
EXPECTED = sum(2 * item for item in range(ITEMS))


def double(x: int) -> int:
    return 2 * x


async def double_async(x: int) -> int:
    return 2 * x


# --- sync items, in a script ---------------------------------------------------------------

_pool = ThreadPoolExecutor(THREADS)


def anyfork_map_sync() -> int:
    return sum(anyfork.map(double, range(ITEMS)))


def executor_map() -> int:
    return sum(_pool.map(double, range(ITEMS)))


# --- coroutine items, on a loop ------------------------------------------------------------


async def anyfork_map_async() -> int:
    total = 0
    async for value in anyfork.map(double_async, range(ITEMS), limit=LIMIT):
        total += value
    return total


async def task_group_with_limiter() -> int:
    limiter = anyio.CapacityLimiter(LIMIT)
    results = [0] * ITEMS

    async def one(index: int) -> None:
        async with limiter:
            results[index] = await double_async(index)

    async with anyio.create_task_group() as tg:
        for index in range(ITEMS):
            tg.start_soon(one, index)
    return sum(results)


# --- timing --------------------------------------------------------------------------------


def timed(run: Callable[[], int]) -> float:
    """µs per item for one sample."""
    gc.collect()
    start = time.perf_counter()
    got = run()
    elapsed = time.perf_counter() - start
    assert got == EXPECTED, (run, got)
    return elapsed / ITEMS * 1e6


def compare(case: str, contenders: dict[str, Callable[[], int]]) -> tuple[str, float, float]:
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # warm up, untimed
        contenders[name]()
        contenders[name]()
    for round_ in range(ROUNDS):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(contenders[name]))
    ours, theirs = (statistics.median(samples[name]) for name in names)
    ratio = ours / theirs
    print(f"{case:<38} {names[0]:>12} {ours:7.1f}  {names[1]:>22} {theirs:7.1f}  {ratio:5.2f}x")
    return case, ours, theirs


def on_loop(backend: str, func: Callable[[], object]) -> Callable[[], int]:
    def run() -> int:
        result = anyio.run(func, backend=backend)  # type: ignore[arg-type]
        assert isinstance(result, int)
        return result

    return run


def main() -> None:
    print(f"anyfork.map, µs per item, {ITEMS:,} items, median of {ROUNDS} rounds")
    print(f"(worker_threads = {THREADS}; coroutine limit = {LIMIT})")
    rows = [
        compare(
            "sync items, script",
            {"anyfork.map": anyfork_map_sync, "ThreadPoolExecutor.map": executor_map},
        ),
        compare(
            "coroutine items, asyncio, async for",
            {
                "anyfork.map": on_loop("asyncio", anyfork_map_async),
                "task group + limiter": on_loop("asyncio", task_group_with_limiter),
            },
        ),
        compare(
            "coroutine items, trio, async for",
            {
                "anyfork.map": on_loop("trio", anyfork_map_async),
                "task group + limiter": on_loop("trio", task_group_with_limiter),
            },
        ),
    ]
    print("\ntargets (ratio <= 1.00):")
    for case, ours, theirs in rows:
        ratio = ours / theirs
        print(f"  {case:<38} {ratio:5.2f}x  {'ok' if ratio <= 1.0 else 'MISSED'}")
    _pool.shutdown()


if __name__ == "__main__":
    main()
