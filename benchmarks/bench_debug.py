"""What debug mode costs per fork, and what anyfork.pending() costs per pending fork.

Run by ``nox -s bench``. Prints medians of several rounds, in one run: fork+wait in a script
with debug mode off and on, the difference, and the time of one pending() call with N forks
pending.
"""

from __future__ import annotations

import statistics
import threading
import time

import anyfork

ROUNDS = 7
FORKS = 5_000


def _fork_and_wait_per_fork(debug: bool) -> float:
    anyfork.configure(debug=debug)
    start = time.perf_counter()
    for i in range(FORKS):
        anyfork.wait(anyfork.fork(abs, -i))
    took = (time.perf_counter() - start) / FORKS * 1e6
    anyfork.configure(debug=False)
    return took


def _pending_call(count: int) -> float:
    release = threading.Event()
    anyfork.configure(worker_threads=1)
    futures = [anyfork.fork(release.wait, 60) for _ in range(count)]
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        records = anyfork.pending()
        samples.append((time.perf_counter() - start) * 1e6)
        assert len(records) >= count
    release.set()
    anyfork.wait_all(futures, timeout=60)
    return statistics.median(samples)


def main() -> None:
    _fork_and_wait_per_fork(False)  # warm up
    # Off and on take turns, so that a change in the machine's load hits both alike.
    pairs = [(_fork_and_wait_per_fork(False), _fork_and_wait_per_fork(True)) for _ in range(ROUNDS)]
    off = statistics.median(pair[0] for pair in pairs)
    on = statistics.median(pair[1] for pair in pairs)
    print(f"debug mode, fork+wait in a script ({FORKS} forks, median of {ROUNDS}):")
    print(f"  off {off:6.2f} us   on {on:6.2f} us   debug costs {on - off:+.2f} us per fork")
    for count in (10, 1_000):
        took = _pending_call(count)
        print(
            f"anyfork.pending() with {count:>5} forks pending: {took:8.1f} us "
            f"({took / count:.2f} us per fork)"
        )


if __name__ == "__main__":
    main()
