"""µs per fork+wait for anyfork and the alternatives it replaces, measured in one run.

Usage: ``nox -s bench`` (or ``python benchmarks/bench_fork.py [--quick]``).

Two shapes are timed for each row: *one at a time* (fork, then wait, repeated: latency) and
*fan-out* (fork 100, then wait for all: throughput). Each figure is the best of several
rounds, in µs per fork. Ratios compare anyfork with the alternative on the same line; below
1.00 means anyfork is faster.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import anyio
import anyio.to_thread

import anyfork

QUICK = "--quick" in sys.argv
ROUNDS = 3 if QUICK else 7
ONE_BY_ONE = 300 if QUICK else 2000
FAN_OUT = 100
FAN_OUT_REPEATS = 5 if QUICK else 20


async def coro_work() -> int:
    return 1


def sync_work() -> int:
    return 1


def best_of(measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(ROUNDS))


# --- async alternatives -------------------------------------------------------------------


async def asyncio_create_task(n: int, fan: bool) -> None:
    if fan:
        tasks = [asyncio.create_task(coro_work()) for _ in range(n)]
        for task in tasks:
            await task
    else:
        for _ in range(n):
            await asyncio.create_task(coro_work())


async def anyio_start_soon(n: int, fan: bool) -> None:
    async with anyio.create_task_group() as tg:
        if fan:
            handles = [tg.start_soon(coro_work) for _ in range(n)]
            for handle in handles:
                await handle
        else:
            for _ in range(n):
                await tg.start_soon(coro_work)


async def anyfork_coroutine(n: int, fan: bool) -> None:
    if fan:
        futures = [anyfork.fork(coro_work) for _ in range(n)]
        for future in futures:
            await future
    else:
        for _ in range(n):
            await anyfork.fork(coro_work)


async def anyio_to_thread(n: int, fan: bool) -> None:
    if fan:
        async with anyio.create_task_group() as tg:
            handles = [tg.start_soon(anyio.to_thread.run_sync, sync_work) for _ in range(n)]
            for handle in handles:
                await handle
    else:
        for _ in range(n):
            await anyio.to_thread.run_sync(sync_work)


async def anyfork_sync(n: int, fan: bool) -> None:
    if fan:
        futures = [anyfork.fork(sync_work) for _ in range(n)]
        for future in futures:
            await future
    else:
        for _ in range(n):
            await anyfork.fork(sync_work)


# --- script alternatives ------------------------------------------------------------------

_pool = ThreadPoolExecutor(max_workers=anyfork.configure().worker_threads)


def pool_submit(n: int, fan: bool) -> None:
    if fan:
        futures = [_pool.submit(sync_work) for _ in range(n)]
        for future in futures:
            future.result()
    else:
        for _ in range(n):
            _pool.submit(sync_work).result()


def anyfork_script(n: int, fan: bool) -> None:
    if fan:
        anyfork.wait_all([anyfork.fork(sync_work) for _ in range(n)])
    else:
        for _ in range(n):
            anyfork.fork(sync_work).wait()


def time_async(
    func: Callable[[int, bool], Awaitable[None]],
    fan: bool,
    backend: str,
    options: dict[str, object],
) -> float:
    async def main() -> float:
        await func(10, fan)  # warm up: threads, ambient group
        started = time.perf_counter()
        if fan:
            for _ in range(FAN_OUT_REPEATS):
                await func(FAN_OUT, True)
            count = FAN_OUT * FAN_OUT_REPEATS
        else:
            await func(ONE_BY_ONE, False)
            count = ONE_BY_ONE
        return (time.perf_counter() - started) / count * 1e6

    return best_of(lambda: anyio.run(main, backend=backend, backend_options=options))


def time_sync(func: Callable[[int, bool], None], fan: bool) -> float:
    func(10, fan)

    def measure() -> float:
        started = time.perf_counter()
        if fan:
            for _ in range(FAN_OUT_REPEATS):
                func(FAN_OUT, True)
            count = FAN_OUT * FAN_OUT_REPEATS
        else:
            func(ONE_BY_ONE, False)
            count = ONE_BY_ONE
        return (time.perf_counter() - started) / count * 1e6

    return best_of(measure)


def main() -> None:
    loops: list[tuple[str, str, dict[str, object]]] = [("asyncio", "asyncio", {})]
    try:
        import uvloop

        loops.append(("uvloop", "asyncio", {"loop_factory": uvloop.new_event_loop}))
    except ImportError:
        pass
    loops.append(("trio", "trio", {}))

    rows: list[tuple[str, str, float, str, float]] = []
    for label, backend, options in loops:
        for fan in (False, True):
            shape = "fan-out" if fan else "one at a time"
            ours = time_async(anyfork_coroutine, fan, backend, options)
            if backend == "asyncio":
                raw = time_async(asyncio_create_task, fan, backend, options)
                rows.append(
                    (
                        f"coroutine {shape} [{label}]",
                        "asyncio.create_task",
                        raw,
                        "anyfork.fork",
                        ours,
                    )
                )
            theirs = time_async(anyio_start_soon, fan, backend, options)
            rows.append(
                (f"coroutine {shape} [{label}]", "anyio start_soon", theirs, "anyfork.fork", ours)
            )
            ours = time_async(anyfork_sync, fan, backend, options)
            theirs = time_async(anyio_to_thread, fan, backend, options)
            rows.append(
                (f"sync {shape} [{label}]", "anyio to_thread", theirs, "anyfork.fork", ours)
            )
    for fan in (False, True):
        shape = "fan-out" if fan else "one at a time"
        rows.append(
            (
                f"script {shape}",
                "ThreadPoolExecutor",
                time_sync(pool_submit, fan),
                "anyfork.fork",
                time_sync(anyfork_script, fan),
            )
        )

    versions = f"Python {sys.version.split()[0]}, anyio {metadata.version('anyio')}"
    print(versions, f"({os.cpu_count()} cores)")
    print(f"{'case':34} {'alternative':22} {'µs':>8} {'anyfork µs':>11} {'ratio':>6}")
    for case, alt, theirs, _, ours in rows:
        print(f"{case:34} {alt:22} {theirs:8.1f} {ours:11.1f} {ours / theirs:6.2f}")
    ratios = [ours / theirs for *_, theirs, _, ours in rows]
    print(f"median ratio anyfork/alternative: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
