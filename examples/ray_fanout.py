"""Fan out CPU-heavy work onto Ray with the same fork/wait code as on one machine.

With no setup, the first remote fork starts an embedded local Ray on this machine (on a
long-lived thread of anyfork's, shut down at exit); set RAY_ADDRESS to use a running cluster
instead. A fork runs at most once: Ray's retries of crashed tasks are off unless asked for.
"""

from __future__ import annotations

import anyio

import anyfork
import anyfork.ray


@anyfork.ray.remote(num_cpus=1)
def count_primes(limit: int) -> int:  # runs in a Ray worker process when forked
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
    # Optional: the first fork would connect the same way. Ray logs its start at INFO.
    anyfork.ray.connect(logging_level="error")
    in_a_script()
    anyio.run(in_async_code, backend="trio")
