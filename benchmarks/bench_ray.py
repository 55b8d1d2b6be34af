"""Remote fork+wait on Ray against raw Ray, on the same local Ray, and through anyfork.dask.

Usage: ``nox -s bench_ray`` (or ``python benchmarks/bench_ray.py [--quick]``).

One embedded local Ray (``address="local"``, 2 CPUs, no dashboard), started by
``anyfork.ray.connect``, and a Dask ``LocalCluster`` of 2 worker processes of 1 thread each
for the "which engine" comparison. Rows:

* *latency*: one call at a time, ``f.remote()`` + ``ray.get`` against ``fork`` + ``wait``,
  in ms per call;
* *fan-out*: 200 calls submitted (forked), then all waited for, in ms per fan-out.

Each figure is the median of several rounds, alternating the contenders so that a busy
machine slows all of them alike. The ratios compare anyfork.ray with raw Ray on the same
line (target: at most 1.1), and anyfork.dask with anyfork.ray.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import distributed
import ray

import anyfork
import anyfork.dask
import anyfork.ray

QUICK = "--quick" in sys.argv
ROUNDS = 5 if QUICK else 15
ONE_BY_ONE = 20 if QUICK else 50
FAN_OUT = 200


def inc(x: int) -> int:
    return x + 1


ray_inc = anyfork.ray.remote(inc)
dask_inc = anyfork.dask.remote(inc)
raw_inc: Any = ray.remote(max_retries=0)(inc)


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    anyfork.ray.connect(num_cpus=2).wait(180)
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
    )
    client = distributed.Client(cluster, set_as_default=False)
    anyfork.dask.connect(client).wait(60)
    try:
        run_rounds()
    finally:
        anyfork.dask.close()
        client.close()
        cluster.close()
        anyfork.ray.close()


def run_rounds() -> None:
    def raw_latency() -> None:
        for i in range(ONE_BY_ONE):
            ray.get(raw_inc.remote(i))

    def ray_latency() -> None:
        for i in range(ONE_BY_ONE):
            anyfork.wait(anyfork.fork(ray_inc, i))

    def dask_latency() -> None:
        for i in range(ONE_BY_ONE):
            anyfork.wait(anyfork.fork(dask_inc, i))

    def raw_fan_out() -> None:
        ray.get([raw_inc.remote(i) for i in range(FAN_OUT)])

    def ray_fan_out() -> None:
        anyfork.wait_all([anyfork.fork(ray_inc, i) for i in range(FAN_OUT)])

    def dask_fan_out() -> None:
        anyfork.wait_all([anyfork.fork(dask_inc, i) for i in range(FAN_OUT)])

    latency = "latency: "
    fan_out = f"fan-out {FAN_OUT}: "
    contenders = {
        latency + "ray f.remote() + ray.get": (raw_latency, ONE_BY_ONE),
        latency + "anyfork.ray fork + wait": (ray_latency, ONE_BY_ONE),
        latency + "anyfork.dask fork + wait": (dask_latency, ONE_BY_ONE),
        fan_out + "ray f.remote() + ray.get": (raw_fan_out, 1),
        fan_out + "anyfork.ray fork + wait_all": (ray_fan_out, 1),
        fan_out + "anyfork.dask fork + wait_all": (dask_fan_out, 1),
    }
    for run, _ in contenders.values():  # warm up: imports, workers, caches
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, (run, calls) in contenders.items():
            samples[name].append(timed(run) / calls * 1000)
    ms = {name: statistics.median(values) for name, values in samples.items()}

    print(
        f"Python {sys.version.split()[0]}, ray {metadata.version('ray')}, distributed "
        f"{metadata.version('distributed')}, anyfork {anyfork.__version__}; local Ray 2 CPUs, "
        f"LocalCluster 2 processes x 1 thread; median of {ROUNDS} rounds"
    )
    for kind, unit in ((latency, "ms per call"), (fan_out, "ms per fan-out")):
        raw = ms[kind + "ray f.remote() + ray.get"]
        mine = ms[kind + "anyfork.ray fork + wait" + ("_all" if kind == fan_out else "")]
        dask = ms[kind + "anyfork.dask fork + wait" + ("_all" if kind == fan_out else "")]
        print(
            f"{kind:<16} raw Ray {raw:8.2f}  anyfork.ray {mine:8.2f}  anyfork.dask {dask:8.2f} "
            f"{unit}   anyfork.ray/raw {mine / raw:.2f}   anyfork.dask/anyfork.ray "
            f"{dask / mine:.2f}"
        )


if __name__ == "__main__":
    main()
