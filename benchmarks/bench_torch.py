"""A model forward that forks K independent sub-module calls: anyfork against torch.jit.fork.

Variants, each timed over the same inputs in one run:

- sequential: the branches called one after another;
- anyfork in a script: ``anyfork.fork`` each branch (worker threads), ``anyfork.wait_all``;
- anyfork in an async app: the same forks awaited inside ``anyio.run``;
- the same async app written by hand, for comparison: an anyio task group running each
  branch with ``anyio.to_thread.run_sync``, and ``asyncio.gather`` over
  ``loop.run_in_executor`` (a ``ThreadPoolExecutor``), each with as many threads as anyfork;
- torch.jit.fork: the module scripted, its forward forking each branch in TorchScript
  (run in parallel on torch's inter-op pool);
- torch.jit.fork, eager: the same forward not scripted (torch runs each fork at the call).

Intra-op parallelism is set to one thread, so that the figures measure running branches
side by side (inter-op parallelism); otherwise a single large matmul would already use every
core. Matrix sizes are large enough that torch releases the GIL for most of each branch.

    python benchmarks/bench_torch.py [--branches K] [--width D] [--batch B] [--repeat N]
        [--rounds R] [--worker-threads W]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import torch

import anyfork


class Branch(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = torch.nn.Linear(width, width)
        self.second = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


class Sequential(torch.nn.Module):
    def __init__(self, branches: torch.nn.ModuleList) -> None:
        super().__init__()
        self.branches = branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class JitForked(torch.nn.Module):
    """The torch.jit.fork version: fork each branch, then wait for all."""

    def __init__(self, branches: torch.nn.ModuleList) -> None:
        super().__init__()
        self.branches = branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        futures: list[torch.jit.Future[torch.Tensor]] = []
        for branch in self.branches:
            futures.append(torch.jit.fork(branch, x))
        return torch.stack([torch.jit.wait(future) for future in futures]).sum(0)


class AnyforkForked(torch.nn.Module):
    """The anyfork version: a one-line change of the torch.jit.fork version."""

    def __init__(self, branches: torch.nn.ModuleList) -> None:
        super().__init__()
        self.branches = branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        futures = [anyfork.fork(branch, x) for branch in self.branches]
        return torch.stack(anyfork.wait_all(futures)).sum(0)


def median_time(run: Callable[[], Any], repeat: int) -> float:
    for _ in range(3):  # warm up: allocator, thread pools, TorchScript profiling runs
        run()
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=None,
        help="anyfork.configure(worker_threads=) for both anyfork variants; by default "
        "sized to the cores as the docs advise for CPU-bound work: cores - 1 in the script "
        "(the waiting thread works too), cores in the async app",
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    script_threads = args.worker_threads or max(1, cores - 1)
    app_threads = args.worker_threads or cores

    torch.set_num_threads(1)
    torch.manual_seed(0)
    branches = torch.nn.ModuleList(Branch(args.width) for _ in range(args.branches)).eval()
    x = torch.randn(args.batch, args.width)
    sequential = Sequential(branches)
    forked = AnyforkForked(branches)
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript
        warnings.simplefilter("ignore")
        eager_jit = JitForked(branches)
        scripted = torch.jit.script(JitForked(branches))

    async def async_forward() -> torch.Tensor:
        futures = [anyfork.fork(branch, x) for branch in branches]
        return torch.stack([await future for future in futures]).sum(0)

    async def task_group_forward(limiter: anyio.CapacityLimiter) -> torch.Tensor:
        outputs: list[torch.Tensor] = []

        async def run(branch: torch.nn.Module) -> None:
            outputs.append(await anyio.to_thread.run_sync(branch, x, limiter=limiter))

        async with anyio.create_task_group() as tg:
            for branch in branches:
                tg.start_soon(run, branch)
        return torch.stack(outputs).sum(0)

    executor = concurrent.futures.ThreadPoolExecutor(app_threads)

    async def executor_forward() -> torch.Tensor:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(executor, branch, x) for branch in branches]
        return torch.stack(await asyncio.gather(*calls)).sum(0)

    async def time_in_app(forward: Callable[[], Any]) -> float:
        # One running app: time forwards inside it, as a server would run them.
        for _ in range(3):
            await forward()
        timings = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            await forward()
            timings.append(time.perf_counter() - started)
        return statistics.median(timings)

    async def time_task_group_forward() -> float:
        limiter = anyio.CapacityLimiter(app_threads)
        return await time_in_app(lambda: task_group_forward(limiter))

    async def time_executor_forward() -> float:
        return await time_in_app(executor_forward)

    def with_threads(threads: int, measure: Callable[[], float]) -> float:
        # anyfork's one worker pool reads worker_threads live: set it for each variant.
        anyfork.configure(worker_threads=threads)
        return measure()

    variants: dict[str, Callable[[], float]] = {
        "sequential": lambda: median_time(lambda: sequential(x), args.repeat),
        "anyfork, script": lambda: with_threads(
            script_threads, lambda: median_time(lambda: forked(x), args.repeat)
        ),
        "anyfork, async app": lambda: with_threads(
            app_threads, lambda: anyio.run(time_in_app, async_forward)
        ),
        "anyio task group, async app": lambda: anyio.run(time_task_group_forward),
        "run_in_executor, async app": lambda: asyncio.run(time_executor_forward()),
        "torch.jit.fork, scripted": lambda: median_time(lambda: scripted(x), args.repeat),
        "torch.jit.fork, eager": lambda: median_time(lambda: eager_jit(x), args.repeat),
    }
    timings: dict[str, float] = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sequential(x)
        anyfork.configure(worker_threads=app_threads)
        outputs = [forked(x), scripted(x), eager_jit(x), anyio.run(async_forward)]
        outputs.append(anyio.run(task_group_forward, anyio.CapacityLimiter(app_threads)))
        outputs.append(asyncio.run(executor_forward()))
        for output in outputs:
            torch.testing.assert_close(output, expected)
        # Alternate the variants round by round; each keeps its best round's median.
        for _ in range(args.rounds):
            for name, measure in variants.items():
                timings[name] = min(timings.get(name, float("inf")), measure())

    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} "
        f"cores, 1 intra-op thread, {torch.get_num_interop_threads()} inter-op threads; "
        f"anyfork worker_threads={script_threads} in the script, {app_threads} in the app"
    )
    print(
        f"{args.branches} branches of Linear({args.width})-ReLU-Linear({args.width}) on a "
        f"batch of {args.batch}; best of {args.rounds} rounds of the median of "
        f"{args.repeat} forwards"
    )
    base = timings["sequential"]
    print(f"{'variant':<30} {'ms':>8} {'speedup':>8}")
    for name, seconds in timings.items():
        print(f"{name:<30} {seconds * 1000:>8.1f} {base / seconds:>7.2f}x")
    ratio = timings["torch.jit.fork, scripted"] / timings["anyfork, script"]
    print(f"anyfork script vs TorchScript: {ratio:.2f}x (above 1: anyfork faster)")
    for by_hand in ("anyio task group, async app", "run_in_executor, async app"):
        ratio = timings[by_hand] / timings["anyfork, async app"]
        print(f"anyfork async app vs {by_hand}: {ratio:.2f}x (above 1: anyfork faster)")
    executor.shutdown()


if __name__ == "__main__":
    main()
