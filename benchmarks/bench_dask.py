"""Remote fork+wait on Dask against raw Dask, on the same LocalCluster, in one run.

Usage: ``nox -s bench_dask`` (or ``python benchmarks/bench_dask.py [--quick]``).

The cluster: 2 worker processes of 1 thread each on 127.0.0.1 (no dashboard). Rows:

* *latency*: one call at a time, submit (fork) then result (wait), in ms per call;
* *fan-out*: 200 calls submitted (forked), then all gathered (waited for), in ms per
  fan-out, against ``client.submit`` + ``client.gather`` and ``client.map`` + ``gather``.

Each figure is the median of several rounds, alternating the contenders so that a busy
machine slows all of them alike. Ratios compare anyfork with the raw Dask figure on the
same line: the target is at most 1.1.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata

import distributed

import anyfork
import anyfork.dask

QUICK = "--quick" in sys.argv
ROUNDS = 5 if QUICK else 15
ONE_BY_ONE = 20 if QUICK else 50
FAN_OUT = 200


def inc(x: int) -> int:
    return x + 1


remote_inc = anyfork.dask.remote(inc)


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
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
        run_rounds(client)
    finally:
        anyfork.dask.close()
        client.close()
        cluster.close()


def run_rounds(client: distributed.Client) -> None:
    def raw_latency() -> None:
        for i in range(ONE_BY_ONE):
            client.submit(inc, i, pure=False).result()

    def anyfork_latency() -> None:
        for i in range(ONE_BY_ONE):
            anyfork.wait(anyfork.fork(remote_inc, i))

    def raw_submit_gather() -> None:
        client.gather([client.submit(inc, i, pure=False) for i in range(FAN_OUT)])

    def raw_map_gather() -> None:
        client.gather(client.map(inc, range(FAN_OUT), pure=False))

    def anyfork_fan_out() -> None:
        anyfork.wait_all([anyfork.fork(remote_inc, i) for i in range(FAN_OUT)])

    contenders = {
        "latency: submit + result": (raw_latency, ONE_BY_ONE),
        "latency: anyfork fork + wait": (anyfork_latency, ONE_BY_ONE),
        f"fan-out {FAN_OUT}: submit + gather": (raw_submit_gather, 1),
        f"fan-out {FAN_OUT}: map + gather": (raw_map_gather, 1),
        f"fan-out {FAN_OUT}: anyfork fork + wait_all": (anyfork_fan_out, 1),
    }
    for run, _ in contenders.values():  # warm up: imports, connections, worker caches
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, (run, calls) in contenders.items():
            samples[name].append(timed(run) / calls * 1000)
    ms = {name: statistics.median(values) for name, values in samples.items()}

    print(
        f"Python {sys.version.split()[0]}, distributed {metadata.version('distributed')}, "
        f"anyfork {anyfork.__version__}; LocalCluster 2 processes x 1 thread; "
        f"median of {ROUNDS} rounds"
    )
    rows = [
        ("latency: anyfork fork + wait", "latency: submit + result", "ms per call"),
        (
            f"fan-out {FAN_OUT}: anyfork fork + wait_all",
            f"fan-out {FAN_OUT}: submit + gather",
            "ms per fan-out",
        ),
        (
            f"fan-out {FAN_OUT}: anyfork fork + wait_all",
            f"fan-out {FAN_OUT}: map + gather",
            "ms per fan-out",
        ),
    ]
    for mine, raw, unit in rows:
        print(
            f"{mine:<45} {ms[mine]:8.2f}   {raw:<35} {ms[raw]:8.2f} {unit}   "
            f"ratio {ms[mine] / ms[raw]:.2f}"
        )


if __name__ == "__main__":
    main()
