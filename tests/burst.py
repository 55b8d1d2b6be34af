"""One stress burst, run in a fresh interpreter by ``tests/test_stress.py``.

    python tests/burst.py RUNNER FORKS SEED

RUNNER is asyncio, uvloop, trio or script. The burst makes FORKS forks that mix coroutine
and sync work with random delays, failures, cancellations (from the forking side and from
another thread) and nested forks; on a loop, waves alternate between a scope and the
ambient group. Every outcome is checked against what the fork was told to do; a mismatch
raises. The last line printed is a JSON object of figures.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import json
import random
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

import anyfork

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

WAVE = 2_000


class StressError(Exception):
    pass


@dataclass
class Plan:
    index: int
    is_async: bool
    delay: float
    fails: bool
    nested: bool
    cancel_from: str | None  # None, "forker" or "thread"
    cancel_after: float  # seconds the cancelling thread waits first


class Burst:
    def __init__(self, forks: int, seed: int) -> None:
        rng = random.Random(seed)
        self.plans = [
            Plan(
                index=i,
                is_async=rng.random() < 0.55,
                delay=0.0 if rng.random() < 0.7 else rng.uniform(0, 0.002),
                fails=rng.random() < 0.1,
                nested=rng.random() < 0.05,
                cancel_from=rng.choice(["forker", "thread"]) if rng.random() < 0.08 else None,
                cancel_after=rng.choice([0.0, rng.uniform(0, 0.002)]),
            )
            for i in range(forks)
        ]
        self.runs = [0] * forks
        self.done_calls = [0] * forks
        # Done callbacks run in the completing thread after the future's waiters wake (as
        # concurrent.futures does), so finish() waits until every fork's callback has run.
        self.done_call_total = 0
        self.done_lock = threading.Lock()
        self.all_called_back = threading.Event()
        self.cancel_returned: list[bool | None] = [None] * forks
        self.live = 0
        self.live_lock = threading.Lock()
        self.checked = 0
        self.cancelled = 0
        self.failed = 0

    # -- the work --------------------------------------------------------------------

    def _enter(self, plan: Plan) -> None:
        self.runs[plan.index] += 1
        with self.live_lock:
            self.live += 1

    def _leave(self) -> None:
        with self.live_lock:
            self.live -= 1

    async def coroutine_job(self, plan: Plan) -> int:
        self._enter(plan)
        try:
            if plan.delay:
                await anyio.sleep(plan.delay)
            if plan.fails:
                raise StressError(plan.index)
            if plan.nested:
                return await anyfork.fork(leaf_coroutine, plan.index) + 1
            return plan.index
        finally:
            self._leave()

    def sync_job(self, plan: Plan) -> int:
        self._enter(plan)
        try:
            if plan.delay:
                time.sleep(plan.delay)
            if plan.fails:
                raise StressError(plan.index)
            if plan.nested:
                return anyfork.wait(anyfork.fork(leaf_sync, plan.index)) + 1
            return plan.index
        finally:
            self._leave()

    def fork(self, plan: Plan) -> anyfork.Future[int]:
        if plan.is_async:
            future = anyfork.fork(self.coroutine_job, plan)
        else:
            future = anyfork.fork(self.sync_job, plan)
        future.add_done_callback(functools.partial(self._count_done, plan.index))
        return future

    def _count_done(self, index: int, future: anyfork.Future[Any]) -> None:
        with self.done_lock:
            self.done_calls[index] += 1
            self.done_call_total += 1
            if self.done_call_total >= len(self.plans):
                self.all_called_back.set()

    # -- checking --------------------------------------------------------------------

    def check(self, plan: Plan, future: anyfork.Future[int], outcome: tuple[Any, ...]) -> None:
        i = plan.index
        if self.cancel_returned[i]:
            assert outcome == ("cancelled",), (plan, outcome)
            # A cancelled coroutine may have started; a cancelled sync fork never starts,
            # because cancel() refuses (returns False) once its thread has it.
            assert self.runs[i] <= (1 if plan.is_async else 0), (plan, self.runs[i])
            self.cancelled += 1
        else:
            assert self.runs[i] == 1, (plan, self.runs[i], outcome)
            if plan.fails:
                assert outcome[0] == "error", (plan, outcome)
                assert isinstance(outcome[1], StressError), (plan, outcome)
                assert outcome[1].args == (i,), (plan, outcome)
                self.failed += 1
            else:
                assert outcome == ("result", i + 1 if plan.nested else i), (plan, outcome)
        self.checked += 1

    def finish(self) -> None:
        assert self.checked == len(self.plans), (self.checked, len(self.plans))
        assert self.all_called_back.wait(60), "done callbacks still missing after 60 s"
        bad = [i for i, calls in enumerate(self.done_calls) if calls != 1]
        assert not bad, f"futures not completed exactly once: {bad[:10]}"


async def leaf_coroutine(index: int) -> int:
    await anyio.lowlevel.checkpoint()
    return index


def leaf_sync(index: int) -> int:
    return index


def observe(get: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("result", get())
    except anyfork.CancelledError:
        return ("cancelled",)
    except Exception as exc:
        return ("error", exc)


async def observe_async(awaitable: Awaitable[Any]) -> tuple[Any, ...]:
    try:
        return ("result", await awaitable)
    except anyfork.CancelledError:
        return ("cancelled",)
    except Exception as exc:
        return ("error", exc)


def start_wave(
    burst: Burst, plans: list[Plan], cancellers: concurrent.futures.Executor
) -> tuple[list[anyfork.Future[int]], list[concurrent.futures.Future[None]]]:
    futures: list[anyfork.Future[int]] = []
    from_threads: list[concurrent.futures.Future[None]] = []
    for plan in plans:
        future = burst.fork(plan)
        futures.append(future)
        if plan.cancel_from == "forker":
            burst.cancel_returned[plan.index] = future.cancel()
        elif plan.cancel_from == "thread":
            from_threads.append(cancellers.submit(cancel_later, burst, plan, future))
    return futures, from_threads


def cancel_later(burst: Burst, plan: Plan, future: anyfork.Future[int]) -> None:
    if plan.cancel_after:
        time.sleep(plan.cancel_after)
    burst.cancel_returned[plan.index] = future.cancel()


async def run_on_loop(burst: Burst, cancellers: concurrent.futures.Executor) -> None:
    for wave, start in enumerate(range(0, len(burst.plans), WAVE)):
        plans = burst.plans[start : start + WAVE]
        if wave % 2 == 0:
            raised: list[BaseException] = []
            try:
                async with anyfork.scope():
                    futures, from_threads = start_wave(burst, plans, cancellers)
            except BaseExceptionGroup as group:
                raised = list(group.exceptions)
            # The scope has joined its forks: none of their work may still be running, and
            # it raised every failure nobody retrieved, each once.
            assert burst.live == 0, f"{burst.live} forks of a closed scope are still running"
            expected = sorted(
                plan.index
                for plan, future in zip(plans, futures, strict=True)
                if plan.fails and not future.cancelled()
            )
            assert sorted(exc.args[0] for exc in raised) == expected, (raised, expected)
        else:
            futures, from_threads = start_wave(burst, plans, cancellers)
        for done in from_threads:
            await anyio.to_thread.run_sync(done.result)
        for plan, future in zip(plans, futures, strict=True):
            burst.check(plan, future, await observe_async(future))


def run_script(burst: Burst, cancellers: concurrent.futures.Executor) -> None:
    for start in range(0, len(burst.plans), WAVE):
        plans = burst.plans[start : start + WAVE]
        futures, from_threads = start_wave(burst, plans, cancellers)
        for done in from_threads:
            done.result()
        for plan, future in zip(plans, futures, strict=True):
            burst.check(plan, future, observe(future.wait))


def live_futures() -> int:
    gc.collect()
    return sum(isinstance(obj, anyfork.Future) for obj in gc.get_objects())


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def threads_settle(baseline: int, bound: float = 30.0) -> tuple[int, float]:
    """Wait (up to ``bound``) for idle worker threads to exit; return the count and time."""
    started = time.perf_counter()
    while threading.active_count() > baseline and time.perf_counter() - started < bound:
        time.sleep(0.1)
    return threading.active_count(), time.perf_counter() - started


def run(runner: str, forks: int, seed: int) -> dict[str, Any]:
    def one(count: int, seed: int) -> float:
        burst = Burst(count, seed)
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="canceller") as pool:
            started = time.perf_counter()
            if runner == "script":
                run_script(burst, pool)
            elif runner == "uvloop":
                import uvloop

                anyio.run(
                    run_on_loop,
                    burst,
                    pool,
                    backend="asyncio",
                    backend_options={"loop_factory": uvloop.new_event_loop},
                )
            else:
                anyio.run(run_on_loop, burst, pool, backend=runner)
            elapsed = time.perf_counter() - started
        burst.finish()
        assert burst.live == 0, f"{burst.live} forks still running after the run"
        return elapsed

    threads_before = threading.active_count()
    # Idle worker threads exit after worker_idle_timeout (10 s), whichever runner forked.
    # What stays: anyfork's one reporter thread (failures nobody retrieved), started by
    # the first failure and alive for the rest of the process; and in a script the
    # background loop's thread and the one worker thread it keeps for the exit join (on
    # Python 3.12+, which starts no thread at exit, up to four worker threads). Nothing else.
    threads_bound = threads_before + 1
    if runner == "script":
        threads_bound += 2
        if sys.version_info >= (3, 12):
            threads_bound += 3
    one(WAVE * 2, seed + 1)  # warm-up: imports, caches, thread pools
    rss_baseline = rss_mib()
    elapsed = one(forks, seed)
    threads_after, settle_seconds = threads_settle(threads_bound)
    alive = live_futures()
    rss_after = rss_mib()
    return {
        "runner": runner,
        "forks": forks,
        "seconds": round(elapsed, 2),
        "forks_per_second": round(forks / elapsed),
        "threads_before": threads_before,
        "threads_after": threads_after,
        "threads_settle_seconds": round(settle_seconds, 1),
        "threads_bound": threads_bound,
        "thread_names": sorted(thread.name for thread in threading.enumerate()),
        "futures_alive_after": alive,
        "rss_baseline_mib": round(rss_baseline, 1),
        "rss_after_mib": round(rss_after, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    runner, forks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(run(runner, forks, seed)))
