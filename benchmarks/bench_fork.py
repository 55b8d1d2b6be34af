"""µs per fork+wait for anyfork and the alternatives it replaces, measured in one run.

Usage: ``nox -s bench [-- --quick]`` (or ``python benchmarks/bench_fork.py [--quick]``).

Each case is timed in two shapes: *one at a time* (fork, then wait for it, again and again:
latency) and *fan-out* (fork 1,000, then wait for each: throughput).

- sync callable, on a loop: ``anyfork.fork(f)`` + ``await`` against ``asyncio.to_thread``,
  ``anyio.to_thread.run_sync`` and ``asyncer.asyncify``; also against what
  ``asyncio.to_thread`` does, ``loop.run_in_executor`` in a copy of the context, on an
  executor with as many threads as anyfork's pool (the default executor has fewer);
- coroutine function, on a loop: ``anyfork.fork(f)`` + ``await`` against
  ``asyncio.create_task``, anyio's ``start_soon`` (awaiting the task handle it returns) and
  asyncer's ``soonify`` in an ``asyncer.create_task_group()``; a soon value can only be read
  once its task group has exited, so one at a time opens one group per fork;
- script, no event loop: ``anyfork.fork(f)`` + ``wait()`` against
  ``ThreadPoolExecutor.submit`` + ``result()``; fan-out once more with ``anyfork.wait_all``.

The loop is plain asyncio (no uvloop, no debug mode); a full run repeats the loop cases on
uvloop and trio (where the alternative runs there). Then a targets block, and the cumulative
import time of ``import anyfork``, from ``python -X importtime`` in fresh processes.

Method: every contender does the same work (the forked function returns 1; the caller sums
what it gets back) and runs on the same loop as its rivals. Each is warmed up with two
untimed samples, then the contenders of a case take turns, round after round, the order
rotated each round, so that noise from a shared machine falls on each alike. A figure is the
median over rounds of µs per fork; garbage is collected before each sample, and the
collector stays on. Ratio = anyfork / alternative: below 1.00, anyfork is faster.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncer

import anyfork

QUICK = "--quick" in sys.argv
# The chart the docs page "Where work runs" shows; --no-chart leaves it as it is.
CHART = (
    None
    if "--no-chart" in sys.argv
    else Path(__file__).parent.parent / "docs" / "img" / "bench_fork.png"
)
ROUNDS = 7 if QUICK else 11
ONE_AT_A_TIME = 500 if QUICK else 2000  # forks per sample, waited for one by one
FAN_OUT = 1000  # forks made before the first wait
FAN_OUTS_PER_SAMPLE = 1 if QUICK else 3
IMPORT_RUNS = 5
SHAPES = ("one at a time", "fan-out")
# The ThreadPoolExecutors compared with anyfork get as many threads as its worker pool.
POOL_THREADS = anyfork.configure().worker_threads


def sync_work() -> int:
    return 1


async def coro_work() -> int:
    return 1


# --- sync callables on a loop ---------------------------------------------------------------


async def anyfork_sync(n: int, fan: bool) -> int:
    if fan:
        futures = [anyfork.fork(sync_work) for _ in range(n)]
        return sum([await future for future in futures])
    total = 0
    for _ in range(n):
        total += await anyfork.fork(sync_work)
    return total


async def asyncio_to_thread(n: int, fan: bool) -> int:
    if fan:
        # Tasks, so that each call starts at once, as a fork does.
        tasks = [asyncio.create_task(asyncio.to_thread(sync_work)) for _ in range(n)]
        return sum([await task for task in tasks])
    total = 0
    for _ in range(n):
        total += await asyncio.to_thread(sync_work)
    return total


# asyncio.to_thread with as many threads as anyfork and anyio use, rather than the default
# executor's min(32, cores + 4): shows how much of a gap is the number of threads.
_loop_pool = ThreadPoolExecutor(max_workers=POOL_THREADS)


def _in_context(func: Callable[[], int]) -> Callable[[], int]:
    return functools.partial(contextvars.copy_context().run, func)


async def asyncio_executor(n: int, fan: bool) -> int:
    loop = asyncio.get_running_loop()
    if fan:  # the futures of run_in_executor start at once, as tasks would
        futures = [loop.run_in_executor(_loop_pool, _in_context(sync_work)) for _ in range(n)]
        return sum([await future for future in futures])
    total = 0
    for _ in range(n):
        total += await loop.run_in_executor(_loop_pool, _in_context(sync_work))
    return total


async def anyio_to_thread(n: int, fan: bool) -> int:
    if fan:
        async with anyio.create_task_group() as tg:
            handles = [tg.start_soon(anyio.to_thread.run_sync, sync_work) for _ in range(n)]
            return sum([await handle for handle in handles])
    total = 0
    for _ in range(n):
        total += await anyio.to_thread.run_sync(sync_work)
    return total


async def asyncer_asyncify(n: int, fan: bool) -> int:
    if fan:
        async with asyncer.create_task_group() as tg:
            values = [tg.soonify(asyncer.asyncify(sync_work))() for _ in range(n)]
        return sum(value.value for value in values)
    total = 0
    for _ in range(n):
        total += await asyncer.asyncify(sync_work)()
    return total


# --- coroutine functions on a loop ----------------------------------------------------------


async def anyfork_coroutine(n: int, fan: bool) -> int:
    if fan:
        futures = [anyfork.fork(coro_work) for _ in range(n)]
        return sum([await future for future in futures])
    total = 0
    for _ in range(n):
        total += await anyfork.fork(coro_work)
    return total


async def asyncio_create_task(n: int, fan: bool) -> int:
    if fan:
        tasks = [asyncio.create_task(coro_work()) for _ in range(n)]
        return sum([await task for task in tasks])
    total = 0
    for _ in range(n):
        total += await asyncio.create_task(coro_work())
    return total


async def anyio_start_soon(n: int, fan: bool) -> int:
    async with anyio.create_task_group() as tg:
        if fan:
            handles = [tg.start_soon(coro_work) for _ in range(n)]
            return sum([await handle for handle in handles])
        total = 0
        for _ in range(n):
            total += await tg.start_soon(coro_work)
        return total


async def asyncer_soonify(n: int, fan: bool) -> int:
    if fan:
        async with asyncer.create_task_group() as tg:
            values = [tg.soonify(coro_work)() for _ in range(n)]
        return sum(value.value for value in values)
    total = 0
    for _ in range(n):
        async with asyncer.create_task_group() as tg:
            value = tg.soonify(coro_work)()
        total += value.value
    return total


# --- scripts, no event loop -----------------------------------------------------------------

_pool = ThreadPoolExecutor(max_workers=POOL_THREADS)


def anyfork_script(n: int, fan: bool) -> int:
    if fan:
        futures = [anyfork.fork(sync_work) for _ in range(n)]
        return sum([future.wait() for future in futures])
    total = 0
    for _ in range(n):
        total += anyfork.fork(sync_work).wait()
    return total


def anyfork_script_wait_all(n: int, fan: bool) -> int:
    return sum(anyfork.wait_all([anyfork.fork(sync_work) for _ in range(n)]))


def pool_submit(n: int, fan: bool) -> int:
    if fan:
        futures = [_pool.submit(sync_work) for _ in range(n)]
        return sum([future.result() for future in futures])
    total = 0
    for _ in range(n):
        total += _pool.submit(sync_work).result()
    return total


# --- timing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    label: str
    run: Callable[[int, bool], Any]  # (forks, fan-out?) -> sum of the values, or awaitable
    ours: bool = False
    asyncio_only: bool = False
    fan_out_only: bool = False


SYNC_ON_A_LOOP = [
    Contender("fork + await", anyfork_sync, ours=True),
    Contender("asyncio.to_thread", asyncio_to_thread, asyncio_only=True),
    Contender(f"run_in_executor, {POOL_THREADS} thr", asyncio_executor, asyncio_only=True),
    Contender("anyio.to_thread.run_sync", anyio_to_thread),
    Contender("asyncer.asyncify", asyncer_asyncify),
]
COROUTINE_ON_A_LOOP = [
    Contender("fork + await", anyfork_coroutine, ours=True),
    Contender("asyncio.create_task", asyncio_create_task, asyncio_only=True),
    Contender("anyio start_soon", anyio_start_soon),
    Contender("asyncer soonify", asyncer_soonify),
]
SCRIPT = [
    Contender("fork + wait", anyfork_script, ours=True),
    Contender("fork + wait_all", anyfork_script_wait_all, ours=True, fan_out_only=True),
    Contender("ThreadPoolExecutor", pool_submit),
]


def sample_size(shape: str) -> tuple[int, int]:
    """(forks per call, calls per sample) for a shape."""
    if shape == "fan-out":
        return FAN_OUT, FAN_OUTS_PER_SAMPLE
    return ONE_AT_A_TIME, 1


def rotated(items: list[Contender], by: int) -> list[Contender]:
    by %= len(items)
    return items[by:] + items[:by]


def check(label: str, got: int, expected: int) -> None:
    if got != expected:  # a contender that skipped work would look fast
        raise RuntimeError(f"{label} returned {got}, expected {expected}")


async def time_on_loop(contenders: list[Contender], shape: str) -> dict[str, list[float]]:
    """µs per fork of each contender, one figure per round, on the running loop."""
    fan = shape == "fan-out"
    n, calls = sample_size(shape)
    samples: dict[str, list[float]] = {c.label: [] for c in contenders}
    for contender in contenders:  # warm-up: threads started, caches and groups made
        for _ in range(2):
            check(contender.label, await contender.run(n, fan), n)
    for round_ in range(ROUNDS):
        for contender in rotated(contenders, round_):
            gc.collect()
            started = time.perf_counter()
            for _ in range(calls):
                await contender.run(n, fan)
            elapsed = time.perf_counter() - started
            samples[contender.label].append(elapsed / (n * calls) * 1e6)
    return samples


def time_in_script(contenders: list[Contender], shape: str) -> dict[str, list[float]]:
    """µs per fork of each contender, one figure per round, with no event loop."""
    fan = shape == "fan-out"
    n, calls = sample_size(shape)
    samples: dict[str, list[float]] = {c.label: [] for c in contenders}
    for contender in contenders:  # warm-up: the pools' threads started
        for _ in range(2):
            check(contender.label, contender.run(n, fan), n)
    for round_ in range(ROUNDS):
        for contender in rotated(contenders, round_):
            gc.collect()
            started = time.perf_counter()
            for _ in range(calls):
                contender.run(n, fan)
            elapsed = time.perf_counter() - started
            samples[contender.label].append(elapsed / (n * calls) * 1e6)
    return samples


@dataclass(frozen=True)
class Figure:
    median: float
    spread: float  # interquartile range / median over the rounds


def figure(samples: list[float]) -> Figure:
    median = statistics.median(samples)
    first, _, third = statistics.quantiles(samples, n=4)
    return Figure(median, (third - first) / median)


@dataclass(frozen=True)
class Row:
    case: str
    ours: str
    ours_figure: Figure
    theirs: str
    theirs_figure: Figure

    @property
    def ratio(self) -> float:
        return self.ours_figure.median / self.theirs_figure.median


def rows_for(case: str, contenders: list[Contender], figures: dict[str, Figure]) -> list[Row]:
    ours = [c for c in contenders if c.ours and c.label in figures]
    theirs = [c for c in contenders if not c.ours and c.label in figures]
    return [
        Row(case, o.label, figures[o.label], t.label, figures[t.label])
        for o in ours
        for t in theirs
    ]


def measure_loop(label: str, backend: str, options: dict[str, object]) -> list[Row]:
    rows: list[Row] = []
    for kind, all_contenders in (
        ("sync callable", SYNC_ON_A_LOOP),
        ("coroutine", COROUTINE_ON_A_LOOP),
    ):
        contenders = [c for c in all_contenders if backend == "asyncio" or not c.asyncio_only]
        for shape in SHAPES:
            samples = anyio.run(
                time_on_loop, contenders, shape, backend=backend, backend_options=options
            )
            figures = {name: figure(values) for name, values in samples.items()}
            rows += rows_for(f"{kind}, {shape} [{label}]", contenders, figures)
    return rows


def measure_script() -> list[Row]:
    rows: list[Row] = []
    for shape in SHAPES:
        contenders = [c for c in SCRIPT if shape == "fan-out" or not c.fan_out_only]
        samples = time_in_script(contenders, shape)
        figures = {name: figure(values) for name, values in samples.items()}
        rows += rows_for(f"script, {shape}", contenders, figures)
    return rows


# --- import time ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportTime:
    cumulative: float  # ms, the whole ``import anyfork``
    own: float  # ms spent in anyfork's own modules
    anyio: float  # ms spent in anyio's modules
    rest: float  # ms spent in every other module it imports (the standard library...)


def import_time() -> ImportTime:
    """What ``import anyfork`` costs in a fresh interpreter (medians, ms)."""

    def once() -> ImportTime:
        # -X importtime prints "import time: self [us] | cumulative | name" on stderr for
        # each module, nested ones indented under their importer. anyio imports its parts
        # lazily, so they need not be nested under "anyio": add up self times by package.
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import anyfork"],
            capture_output=True,
            text=True,
            check=True,
        )
        cumulative = 0.0
        self_ms = {"anyfork": 0.0, "anyio": 0.0, "rest": 0.0}
        for line in done.stderr.splitlines():
            parts = line.removeprefix("import time:").split("|")
            if not line.startswith("import time:") or not parts[0].strip().isdigit():
                continue  # the header line
            name = parts[2].strip()
            package = name.partition(".")[0]
            self_ms[package if package in self_ms else "rest"] += int(parts[0]) / 1000
            if name == "anyfork":
                cumulative = int(parts[1]) / 1000
        return ImportTime(cumulative, self_ms["anyfork"], self_ms["anyio"], self_ms["rest"])

    once()  # byte-compiles what is not compiled yet
    runs = [once() for _ in range(IMPORT_RUNS)]
    return ImportTime(
        *(
            statistics.median(getattr(run, name) for run in runs)
            for name in ("cumulative", "own", "anyio", "rest")
        )
    )


# --- report ---------------------------------------------------------------------------------

# (case without the loop, anyfork's contender, alternative, highest ratio that meets it)
TARGETS = [
    ("sync callable, one at a time", "fork + await", "asyncio.to_thread", 1.0),
    ("sync callable, fan-out", "fork + await", "asyncio.to_thread", 1.0),
    ("script, fan-out", "fork + wait", "ThreadPoolExecutor", 1.0),
    ("script, fan-out", "fork + wait_all", "ThreadPoolExecutor", 1.0),
    ("coroutine, one at a time", "fork + await", "asyncer soonify", 1.0),
    ("coroutine, fan-out", "fork + await", "asyncer soonify", 1.0),
    ("coroutine, one at a time", "fork + await", "anyio start_soon", 1.1),
    ("coroutine, fan-out", "fork + await", "anyio start_soon", 1.1),
]


def print_table(rows: list[Row]) -> None:
    print(f"{'case':39} {'anyfork':16} {'µs':>7}  {'alternative':25} {'µs':>7}  {'ratio':>5}")
    last_case = last_ours = ""
    for row in rows:
        case = row.case if row.case != last_case else ""
        ours = f"{row.ours:16} {row.ours_figure.median:7.1f}"
        if (row.case, row.ours) == (last_case, last_ours):
            ours = ""  # the same anyfork figure as on the line above
        print(
            f"{case:39} {ours:24}  {row.theirs:25} {row.theirs_figure.median:7.1f}  "
            f"{row.ratio:5.2f}"
        )
        last_case, last_ours = row.case, row.ours


def print_targets(rows: list[Row]) -> None:
    print("targets (asyncio; ratio = anyfork / alternative, median µs per fork):")
    by_key = {(r.case, r.ours, r.theirs): r for r in rows}
    for case, ours, theirs, limit in TARGETS:
        loop_case = case if case.startswith("script") else f"{case} [asyncio]"
        row = by_key.get((loop_case, ours, theirs))
        if row is None:
            continue
        verdict = "met" if row.ratio <= limit else "MISSED"
        print(f"  {case}, {ours} vs {theirs}: {row.ratio:.2f}x (target <= {limit:.1f}x)  {verdict}")


def print_noise(rows: list[Row]) -> None:
    figures = {(r.case, r.ours): r.ours_figure for r in rows}
    figures |= {(r.case, r.theirs): r.theirs_figure for r in rows}
    spreads = sorted((f.spread, f"{case}, {who}") for (case, who), f in figures.items())
    worst, where = spreads[-1]
    print(
        f"noise: interquartile range / median over the {ROUNDS} rounds is "
        f"{statistics.median(s for s, _ in spreads):.0%} for the typical figure, "
        f"{worst:.0%} at worst ({where})"
    )


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


async def default_thread_limit() -> float:
    return anyio.to_thread.current_default_thread_limiter().total_tokens


def write_chart(rows: list[Row], path: Path, title: str) -> None:
    """Draw each case's ratios (anyfork / alternative) as bars, with 1.0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row.case} · {row.ours} / {row.theirs}" for row in rows]
    ratios = [row.ratio for row in rows]
    height = max(3.0, 0.28 * len(rows) + 1.2)
    fig, axes = plt.subplots(figsize=(10, height))
    colors = ["#2e7d32" if ratio <= 1.0 else "#c62828" for ratio in ratios]
    positions = list(range(len(rows)))[::-1]
    axes.barh(positions, ratios, color=colors)
    axes.set_yticks(positions, labels, fontsize=7)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("time per fork, anyfork / alternative (below 1: anyfork is faster)")
    axes.set_title(title, fontsize=9)
    for position, ratio in zip(positions, ratios, strict=True):
        axes.text(ratio, position, f" {ratio:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    loops: list[tuple[str, str, dict[str, object]]] = [("asyncio", "asyncio", {})]
    if not QUICK:
        try:
            import uvloop

            loops.append(("uvloop", "asyncio", {"loop_factory": uvloop.new_event_loop}))
        except ImportError:
            pass
        loops.append(("trio", "trio", {}))

    started = time.perf_counter()
    load_before = load_average()
    rows: list[Row] = []
    for label, backend, options in loops:
        rows += measure_loop(label, backend, options)
    rows += measure_script()
    imports = import_time()

    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("anyio", "asyncer", "anyfork")
    )
    print(
        f"Python {sys.version.split()[0]}, {versions}; {os.cpu_count()} cores, 1-minute load "
        f"average {load_before} before, {load_average()} after (other work on the machine "
        "competes for the cores: see the noise line)"
    )
    print(
        f"{ROUNDS} rounds, medians; one at a time: {ONE_AT_A_TIME} forks a sample; fan-out: "
        f"{FAN_OUT} forks, then the waits, {FAN_OUTS_PER_SAMPLE} a sample"
    )
    print(
        f"threads: anyfork, ThreadPoolExecutor, run_in_executor {POOL_THREADS}; "
        f"asyncio.to_thread the loop's default executor ({min(32, (os.cpu_count() or 1) + 4)}); "
        f"anyio and asyncer anyio's default limiter ({anyio.run(default_thread_limit):g})"
    )
    print_table(rows)
    print_noise(rows)
    print_targets(rows)
    print(
        f"import anyfork: {imports.cumulative:.1f} ms cumulative (python -X importtime, median "
        f"of {IMPORT_RUNS} fresh processes); self time in anyfork's modules "
        f"{imports.own:.1f} ms, anyio's {imports.anyio:.1f} ms, the rest {imports.rest:.1f} ms"
    )
    if CHART is not None:
        title = (
            f"nox -s bench{' -- --quick' if QUICK else ''}: Python {sys.version.split()[0]}, "
            f"{versions}, {os.cpu_count()} cores, load {load_before}"
        )
        write_chart(rows, CHART, title)
        print(f"chart: {CHART.relative_to(Path(__file__).parent.parent)}")
    if QUICK:
        print("(--quick: asyncio only; the full run adds uvloop and trio)")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
