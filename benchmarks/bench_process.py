"""Process forks (``anyfork.process``) against the standard ways to run work in processes.

Usage: ``nox -s bench_process`` (or ``python benchmarks/bench_process.py [--quick]``).

Every pool has 2 worker processes, started and warmed up before timing. Rows:

* *round trip*: one call at a time, from a coroutine on asyncio, in ms per call: anyfork
  (``await fork(f, x)``) against ``loop.run_in_executor(ProcessPoolExecutor)`` and
  ``anyio.to_process.run_sync``;
* *fan-out*: 200 small calls forked then all waited for, in ms per fan-out, against
  ``ProcessPoolExecutor.map`` (and ``submit`` + ``result``), from a plain script thread;
* *CPU fan-out*: 8 calls of ~0.25 s of pure-Python work: sequential, anyfork.process, and
  plain sync forks (threads: no faster than sequential under the GIL; on free-threaded
  Python they scale); the best of 5 rounds, the one least slowed by other work;
* *tensor*: if torch is installed, the round trip of a 1M-float (4 MB) tensor, to say
  what pickling costs.

Each figure is the median of several rounds, the contenders alternated so that a busy
machine slows them alike. Ratios compare anyfork with the figure on the same line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_process

sys.path.insert(0, str(Path(__file__).resolve().parent))

from process_jobs import inc, process_echo, process_inc, process_spin, spin

import anyfork

QUICK = "--quick" in sys.argv
ROUNDS = 3 if QUICK else 7
ONE_BY_ONE = 50 if QUICK else 200
FAN_OUT = 200
CPU_CALLS = 8
WORKERS = 2


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def calibrate(seconds: float) -> int:
    """The spin count that takes about ``seconds`` here."""
    n = 200_000
    while (took := timed(functools.partial(spin, n))) < 0.05:
        n *= 2
    return int(n * seconds / took)


async def round_trips(executor: concurrent.futures.ProcessPoolExecutor) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    figures: dict[str, list[float]] = {"anyfork": [], "executor": [], "to_process": []}

    async def anyfork_one_by_one() -> None:
        for i in range(ONE_BY_ONE):
            await anyfork.fork(process_inc, i)

    async def executor_one_by_one() -> None:
        for i in range(ONE_BY_ONE):
            await loop.run_in_executor(executor, inc, i)

    async def to_process_one_by_one() -> None:
        for i in range(ONE_BY_ONE):
            await anyio.to_process.run_sync(inc, i)

    limiter = anyio.CapacityLimiter(WORKERS)
    await anyio.to_process.run_sync(inc, 0, limiter=limiter)  # start its workers
    for _ in range(ROUNDS):
        for name, run in (
            ("anyfork", anyfork_one_by_one),
            ("executor", executor_one_by_one),
            ("to_process", to_process_one_by_one),
        ):
            started = time.perf_counter()
            await run()
            figures[name].append((time.perf_counter() - started) / ONE_BY_ONE * 1000)
    return {name: statistics.median(values) for name, values in figures.items()}


def fan_outs(executor: concurrent.futures.ProcessPoolExecutor) -> dict[str, float]:
    figures: dict[str, list[float]] = {"anyfork": [], "map": [], "submit": []}
    runs: dict[str, Callable[[], object]] = {
        "anyfork": lambda: anyfork.wait_all([anyfork.fork(process_inc, i) for i in range(FAN_OUT)]),
        "map": lambda: list(executor.map(inc, range(FAN_OUT))),
        "submit": lambda: [f.result() for f in [executor.submit(inc, i) for i in range(FAN_OUT)]],
    }
    for _ in range(ROUNDS):
        for name, run in runs.items():
            figures[name].append(timed(run) * 1000)
    return {name: statistics.median(values) for name, values in figures.items()}


def cpu_fan_out(n: int) -> dict[str, float]:
    rounds = 1 if QUICK else 5
    figures: dict[str, list[float]] = {"sequential": [], "process": [], "threads": []}
    runs: dict[str, Callable[[], object]] = {
        "sequential": lambda: [spin(n) for _ in range(CPU_CALLS)],
        "process": lambda: anyfork.wait_all(
            [anyfork.fork(process_spin, n) for _ in range(CPU_CALLS)]
        ),
        "threads": lambda: anyfork.wait_all([anyfork.fork(spin, n) for _ in range(CPU_CALLS)]),
    }
    for _ in range(rounds):
        for name, run in runs.items():
            figures[name].append(timed(run))
    # The best round: on a shared machine, the one least slowed by other work.
    return {name: min(values) for name, values in figures.items()}


def tensor_round_trip() -> tuple[float, float] | None:
    try:
        import torch
    except ImportError:
        return None
    tensor = torch.randn(1_000_000)
    anyfork.fork(process_echo, tensor).wait()  # the worker imports torch
    small = statistics.median(
        timed(lambda: anyfork.fork(process_echo, 1).wait()) for _ in range(20)
    )
    big = statistics.median(
        timed(lambda: anyfork.fork(process_echo, tensor).wait()) for _ in range(20)
    )
    return small * 1000, big * 1000


def row(label: str, figure: float, digits: int, versus: float | None = None) -> None:
    """One line of the table: a figure, and its ratio to ``versus`` (anyfork's figure over
    the other's, or the speed-up over ``versus`` for the CPU rows)."""
    ratio = "" if versus is None else f"   ratio {versus:.2f}"
    print(f"  {label:<39}{figure:8.{digits}f}{ratio}")


def main() -> None:
    anyfork.configure(process_workers=WORKERS)
    free_threaded = not getattr(sys, "_is_gil_enabled", lambda: True)()
    print(f"Python {sys.version.split()[0]}{' free-threaded, GIL off' if free_threaded else ''}")
    started = time.perf_counter()
    anyfork.wait_all([anyfork.fork(process_inc, i) for i in range(WORKERS * 4)])
    cold = (time.perf_counter() - started) * 1000
    print(f"cold start of {WORKERS} worker processes (first fan-out): {cold:.0f} ms")
    # The executor's default start method (fork on Linux before 3.14): its fastest.
    with concurrent.futures.ProcessPoolExecutor(
        WORKERS, mp_context=multiprocessing.get_context()
    ) as executor:
        list(executor.map(inc, range(WORKERS * 4)))
        trips = anyio.run(round_trips, executor)
        fans = fan_outs(executor)
    print(f"\nround trip, one call at a time ({ONE_BY_ONE} calls, median of {ROUNDS}), ms per call")
    row("anyfork.process", trips["anyfork"], 3)
    row(
        "run_in_executor(ProcessPoolExecutor)",
        trips["executor"],
        3,
        trips["anyfork"] / trips["executor"],
    )
    row("anyio.to_process.run_sync", trips["to_process"], 3, trips["anyfork"] / trips["to_process"])
    print(f"\nfan-out of {FAN_OUT} small calls, ms per fan-out")
    row("anyfork fork + wait_all", fans["anyfork"], 1)
    row("ProcessPoolExecutor.map", fans["map"], 1, fans["anyfork"] / fans["map"])
    row("ProcessPoolExecutor submit + result", fans["submit"], 1, fans["anyfork"] / fans["submit"])
    cpu = cpu_fan_out(calibrate(0.25))
    base = cpu["sequential"]
    print(f"\nCPU fan-out: {CPU_CALLS} x ~0.25 s of pure-Python work, {WORKERS} cores, s")
    print("  (the ratio here is the speed-up over sequential)")
    row("sequential", base, 2, 1.0)
    row("anyfork.process", cpu["process"], 2, base / cpu["process"])
    row("plain sync forks (threads)", cpu["threads"], 2, base / cpu["threads"])
    tensor = tensor_round_trip()
    if tensor is not None:
        print("\ntorch tensor round trip (pickled both ways), ms per call")
        row("a small int", tensor[0], 2)
        row("a 1M-float tensor (4 MB)", tensor[1], 2)


if __name__ == "__main__":
    main()
