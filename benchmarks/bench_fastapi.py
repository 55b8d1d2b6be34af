"""Load a FastAPI fan-out endpoint under uvicorn: anyfork against hand-written versions.

Each variant of benchmarks/fastapi_apps.py is served by uvicorn on 127.0.0.1 (a port the
OS picks), in its own process, and loaded over loopback by keep-alive connections from this
process: a fixed number of requests, with timeouts. Variants run in alternating rounds and
the best round counts, to damp the noise of a shared machine. Prints requests/s, p50 and
p99 latency, and anyfork's throughput as a ratio of each hand-written version's.

    python benchmarks/bench_fastapi.py [--requests N] [--connections C] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
VARIANTS = ["anyfork", "anyfork-middleware", "anyio-task-group", "asyncio-gather"]
SERVER = """
import socket, sys, uvicorn
sys.path.insert(0, {here!r})
from fastapi_apps import app
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(1024)
print("port", sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, loop="asyncio", log_level="warning")).run(sockets=[sock])
"""


@dataclass
class Result:
    variant: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float


async def load(port: int, requests: int, connections: int, timeout: float) -> list[float]:
    """Send ``requests`` GET /fanout over ``connections`` keep-alive connections."""
    latencies: list[float] = []
    remaining = requests
    request = b"GET /fanout HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def connection() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"bad response: {head!r}")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await asyncio.wait_for(reader.readexactly(length), timeout)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return latencies


def run_variant(variant: str, requests: int, connections: int) -> Result:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(here=str(HERE))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "BENCH_VARIANT": variant},
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().split()[1])
        # Wait for the server, then warm it up.
        deadline = time.monotonic() + 20
        while True:
            try:
                asyncio.run(load(port, 200, 8, timeout=10))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        started = time.perf_counter()
        latencies = asyncio.run(load(port, requests, connections, timeout=30))
        elapsed = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(10)
    latencies.sort()
    return Result(
        variant,
        len(latencies) / elapsed,
        statistics.median(latencies) * 1000,
        latencies[int(len(latencies) * 0.99) - 1] * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    best: dict[str, Result] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            result = run_variant(variant, args.requests, args.connections)
            if (
                variant not in best
                or result.requests_per_second > best[variant].requests_per_second
            ):
                best[variant] = result

    print(
        f"Python {platform.python_version()}, uvicorn (asyncio loop), {os.cpu_count()} cores; "
        f"{args.requests} requests x {args.rounds} rounds over {args.connections} connections"
    )
    print(f"{'variant':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for variant in VARIANTS:
        r = best[variant]
        print(f"{variant:<20} {r.requests_per_second:>8.0f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f}")
    print("throughput ratio (target >= 0.9):")
    for ours in ("anyfork", "anyfork-middleware"):
        for theirs in ("anyio-task-group", "asyncio-gather"):
            ratio = best[ours].requests_per_second / best[theirs].requests_per_second
            print(f"  {ours} / {theirs}: {ratio:.2f}")


if __name__ == "__main__":
    main()
