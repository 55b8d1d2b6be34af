"""Fan out CPU-heavy work onto a Dask cluster with the same fork/wait code as on one machine.

With no setup, the first remote fork starts an embedded LocalCluster (worker processes on
127.0.0.1); set DASK_SCHEDULER_ADDRESS to use a real cluster instead. Worker processes import
this script again, so its code lives under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import anyio

import anyfork
import anyfork.dask


@anyfork.dask.remote
def count_primes(limit: int) -> int:  # runs in a Dask worker process when forked
    sieve = bytearray([1]) * (limit + 1)
    sieve[:2] = b"\x00\x00"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytearray(len(sieve[n * n :: n]))
    return sum(sieve)


def in_a_script() -> None:
    futures = [anyfork.fork(count_primes, 10_000 * (i + 1)) for i in range(8)]
    print("primes below 10k, 20k, ... 80k:", anyfork.wait_all(futures))


async def in_async_code() -> None:
    async with anyfork.scope():  # joins remote forks like any other
        remote = anyfork.fork(count_primes, 100_000)
        local = anyfork.fork(count_primes.func, 1_000)  # the plain function: here
        print("primes below 100k (remote), 1k (local):", await remote, await local)


if __name__ == "__main__":
    in_a_script()
    anyio.run(in_async_code)
