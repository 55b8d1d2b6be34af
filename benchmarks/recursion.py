"""Fork-and-wait recursion: how deep it goes, how fast, and how many threads it leaves.

Usage: ``python benchmarks/recursion.py`` (``ANYFORK_WORKER_THREADS=1`` for one worker).
A fork that forks itself and waits runs each level inline until a sixteenth of the
recursion limit's worth of levels is on one thread's stack, then continues on another
worker thread.
"""

from __future__ import annotations

import sys
import threading
import time

import anyfork

if "--torch" in sys.argv:  # torch's grad-mode wrapper adds frames to every level
    import torch  # noqa: F401


def recurse(depth: int) -> int:
    return 0 if depth == 0 else 1 + anyfork.wait(anyfork.fork(recurse, depth - 1))


def main() -> None:
    print(
        f"recursion limit {sys.getrecursionlimit()}, worker_threads "
        f"{anyfork.configure().worker_threads}"
    )
    for depth in (100, 1_000, 5_000, 20_000):
        began = time.perf_counter()
        assert anyfork.wait(anyfork.fork(recurse, depth)) == depth
        elapsed = time.perf_counter() - began
        print(f"depth {depth:>6}: {elapsed:.3f} s, threads afterwards {threading.active_count()}")


if __name__ == "__main__":
    main()
