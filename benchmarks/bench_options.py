"""What a limit costs: a fork under ``anyfork.options(limit=n)`` against a plain fork and
against ``anyio.to_thread.run_sync`` guarded by an ``anyio.CapacityLimiter``; and how close
to its deadline a coroutine fork fails.

Usage: ``nox -s bench_options [-- --quick]`` (or ``python benchmarks/bench_options.py``).

Cases (the forked function returns 1; the caller sums what it gets back):

- script, no loop: ``fork(limited)`` + ``wait()`` against ``fork(f)`` + ``wait()``, one at a
  time and fan-out (fork 1,000, then wait for each); the limit is never reached
  (uncontended), so the figure is the limit's own cost;
- on an asyncio loop: ``fork(limited)`` + ``await`` against ``fork(f)`` + ``await`` and
  against ``await anyio.to_thread.run_sync(f, limiter=CapacityLimiter(n))``; one at a time,
  and fan-out (1,000 at once under a limit of 8: contended, the waiters queue);
- deadline: a coroutine fork with ``timeout=0.05`` that sleeps forever, on asyncio and trio:
  how long after its deadline its ``await`` raises ``TimeoutError`` (median and worst).

Contenders take turns, round after round, the order rotated each round; a figure is the
median over rounds of µs per fork. Ratio = anyfork with the limit / alternative.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import anyio
import anyio.to_thread

import anyfork

QUICK = "--quick" in sys.argv
ROUNDS = 5 if QUICK else 9
ONE_AT_A_TIME = 300 if QUICK else 1000
FAN_OUT = 1000
LIMIT = 8


def one() -> int:
    return 1


limited = anyfork.options(one, limit=LIMIT)
limited_fan_out = anyfork.options(one, limit=LIMIT)


def script_plain_one() -> int:
    return sum(anyfork.fork(one).wait() for _ in range(ONE_AT_A_TIME))


def script_limited_one() -> int:
    return sum(anyfork.fork(limited).wait() for _ in range(ONE_AT_A_TIME))


def script_plain_fan_out() -> int:
    futures = [anyfork.fork(one) for _ in range(FAN_OUT)]
    return sum(f.wait() for f in futures)


def script_limited_fan_out() -> int:
    futures = [anyfork.fork(limited_fan_out) for _ in range(FAN_OUT)]
    return sum(f.wait() for f in futures)


async def loop_plain_one() -> int:
    return sum([await anyfork.fork(one) for _ in range(ONE_AT_A_TIME)])


async def loop_limited_one() -> int:
    return sum([await anyfork.fork(limited) for _ in range(ONE_AT_A_TIME)])


LIMITER: anyio.CapacityLimiter | None = None


async def loop_limiter_one() -> int:
    global LIMITER
    LIMITER = LIMITER or anyio.CapacityLimiter(LIMIT)
    total = 0
    for _ in range(ONE_AT_A_TIME):
        total += await anyio.to_thread.run_sync(one, limiter=LIMITER)
    return total


async def loop_plain_fan_out() -> int:
    futures = [anyfork.fork(one) for _ in range(FAN_OUT)]
    return sum([await f for f in futures])


async def loop_limited_fan_out() -> int:
    futures = [anyfork.fork(limited_fan_out) for _ in range(FAN_OUT)]
    return sum([await f for f in futures])


async def loop_limiter_fan_out() -> int:
    limiter = anyio.CapacityLimiter(LIMIT)
    results: list[int] = []

    async def call() -> None:
        results.append(await anyio.to_thread.run_sync(one, limiter=limiter))

    async with anyio.create_task_group() as group:
        for _ in range(FAN_OUT):
            group.start_soon(call)
    return sum(results)


def timed_script(func: Callable[[], int], count: int) -> float:
    gc.collect()
    started = time.perf_counter()
    assert func() == count
    return (time.perf_counter() - started) / count * 1e6


def timed_loop(func: Callable[[], Any], count: int) -> float:
    async def main() -> float:
        gc.collect()
        started = time.perf_counter()
        assert await func() == count
        return (time.perf_counter() - started) / count * 1e6

    return anyio.run(main)


def compare(
    label: str, contenders: dict[str, Callable[[], Any]], count: int, on_loop: bool
) -> dict[str, float]:
    timer = timed_loop if on_loop else timed_script
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # warm up
        timer(contenders[name], count)
    for round_number in range(ROUNDS):
        order = names[round_number % len(names) :] + names[: round_number % len(names)]
        for name in order:
            samples[name].append(timer(contenders[name], count))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    first = names[0]
    print(f"{label}")
    for name in names:
        ratio = "" if name == first else f"   {first} / this = {medians[first] / medians[name]:.2f}"
        print(f"  {name:<42} {medians[name]:8.1f} µs{ratio}")
    return medians


def deadline_lateness(backend: str, samples: int) -> list[float]:
    @anyfork.options(timeout=0.05)
    async def forever() -> None:
        await anyio.sleep(3600)

    async def main() -> list[float]:
        late: list[float] = []
        for _ in range(samples):
            started = time.monotonic()
            try:
                await anyfork.fork(forever)
            except TimeoutError:
                late.append((time.monotonic() - started - 0.05) * 1000)
        return late

    return anyio.run(main, backend=backend)


def main() -> None:
    print(
        f"Python {sys.version.split()[0]}, anyio {metadata.version('anyio')}; "
        f"{ROUNDS} rounds, medians; limit {LIMIT}; one at a time: {ONE_AT_A_TIME} forks a sample"
    )
    targets: list[tuple[str, float, float]] = []
    script_one = compare(
        "script, one at a time (uncontended)",
        {"fork(limited) + wait": script_limited_one, "fork(f) + wait": script_plain_one},
        ONE_AT_A_TIME,
        on_loop=False,
    )
    targets.append(
        (
            "script, one at a time: limited / plain fork",
            script_one["fork(limited) + wait"] / script_one["fork(f) + wait"],
            1.2,
        )
    )
    script_fan = compare(
        f"script, fan-out of {FAN_OUT} (limit {LIMIT}: contended)",
        {"fork(limited) + wait": script_limited_fan_out, "fork(f) + wait": script_plain_fan_out},
        FAN_OUT,
        on_loop=False,
    )
    del script_fan
    loop_one = compare(
        "asyncio, one at a time (uncontended)",
        {
            "fork(limited) + await": loop_limited_one,
            "fork(f) + await": loop_plain_one,
            "to_thread.run_sync(limiter=CapacityLimiter)": loop_limiter_one,
        },
        ONE_AT_A_TIME,
        on_loop=True,
    )
    targets.append(
        (
            "asyncio, one at a time: limited / plain fork",
            loop_one["fork(limited) + await"] / loop_one["fork(f) + await"],
            1.2,
        )
    )
    targets.append(
        (
            "asyncio, one at a time: limited / CapacityLimiter run_sync",
            loop_one["fork(limited) + await"]
            / loop_one["to_thread.run_sync(limiter=CapacityLimiter)"],
            1.0,
        )
    )
    loop_fan = compare(
        f"asyncio, fan-out of {FAN_OUT} (limit {LIMIT}: contended)",
        {
            "fork(limited) + await": loop_limited_fan_out,
            "fork(f) + await": loop_plain_fan_out,
            "to_thread.run_sync(limiter=CapacityLimiter)": loop_limiter_fan_out,
        },
        FAN_OUT,
        on_loop=True,
    )
    targets.append(
        (
            "asyncio, fan-out: limited / CapacityLimiter run_sync",
            loop_fan["fork(limited) + await"]
            / loop_fan["to_thread.run_sync(limiter=CapacityLimiter)"],
            1.0,
        )
    )
    for backend in ("asyncio", "trio"):
        late = deadline_lateness(backend, 10 if QUICK else 30)
        print(
            f"deadline, coroutine fork with timeout=0.05 [{backend}]: TimeoutError "
            f"{statistics.median(late):.1f} ms after the deadline (median), "
            f"{max(late):.1f} ms at worst, over {len(late)} forks"
        )
    print("targets (ratio = anyfork with the limit / alternative, median µs per fork):")
    for label, ratio, target in targets:
        verdict = "met" if ratio <= target else "MISSED"
        print(f"  {label}: {ratio:.2f}x (target <= {target}x)  {verdict}")


if __name__ == "__main__":
    main()
