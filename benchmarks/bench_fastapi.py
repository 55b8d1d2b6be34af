"""Load FastAPI fan-out endpoints under uvicorn with wrk: anyfork against hand-written versions.

Usage: ``nox -s bench_fastapi [-- --quick]`` (or ``python benchmarks/bench_fastapi.py
[--quick] [--duration S] [--warmup S] [--rounds R] [--connections C] [--no-pin]``).
Needs ``wrk`` (Debian and Ubuntu: ``apt-get install -y wrk``).

Each variant (see benchmarks/fastapi_apps.py) gets a fresh uvicorn server: one worker
process, plain asyncio loop (no uvloop), httptools, bound to 127.0.0.1 on a port the OS
picks. Once it answers correctly, wrk warms it up, then loads it (one thread, keep-alive
connections, ``--latency``); the server is then stopped by its pid. Variants run in rounds,
forwards then backwards (A B C, C B A, ...), so that a drift in the machine's load falls on
each alike. With two or more cores the server is pinned to one CPU and wrk to another, so
that they do not take turns on one core; other work on the machine still competes with both.

Prints, per variant, requests/s (best and median of the rounds, and each round's), p50 and
p99 latency (medians of the rounds), the CPU the server used during the load and the CPU
other processes used meanwhile on the server's core (contention), and errors;
then anyfork's throughput as a ratio of each hand-written version's, with the targets of
issue 11. Nothing is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

import anyfork

HERE = Path(__file__).parent
INSTALL_WRK = (
    "wrk is not installed: install it (Debian/Ubuntu: 'apt-get install -y wrk'; macOS: "
    "'brew install wrk') and run this again"
)


@dataclass(frozen=True)
class Variant:
    group: str  # which endpoint: "io" or "blocking"
    label: str
    app: str  # the app object in fastapi_apps
    path: str


VARIANTS = [
    Variant("io", "anyfork, zero setup", "app", "/io/anyfork"),
    Variant("io", "anyfork, middleware+lifespan", "scoped_app", "/io/anyfork"),
    Variant("io", "anyio task group", "app", "/io/task-group"),
    Variant("io", "asyncio.gather", "app", "/io/gather"),
    Variant("blocking", "anyfork", "app", "/blocking/anyfork"),
    Variant("blocking", "asyncio.to_thread", "app", "/blocking/to-thread"),
    Variant("blocking", "anyio.to_thread.run_sync", "app", "/blocking/anyio-to-thread"),
]
GROUPS = {
    "io": "fan-out of three awaited I/O calls (anyio.sleep(0.001) each)",
    "blocking": "fan-out of three blocking calls (time.sleep(0.001) in a def, in threads)",
}
# (group, anyfork's variant, the alternative, lowest throughput ratio that meets the target)
TARGETS = [
    ("io", "anyfork, zero setup", "anyio task group", 0.95),
    ("io", "anyfork, zero setup", "asyncio.gather", 0.9),
    ("io", "anyfork, middleware+lifespan", "anyio task group", None),
    ("io", "anyfork, middleware+lifespan", "asyncio.gather", 0.9),
    ("blocking", "anyfork", "asyncio.to_thread", 0.9),
    ("blocking", "anyfork", "anyio.to_thread.run_sync", 0.95),
]


@dataclass(frozen=True)
class Run:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # CPU seconds the server used per second of load (1.0 = one core)
    other_cpu: float  # the same for other processes on the server's core (or, unpinned,
    # on all cores, but wrk)
    errors: int  # socket errors and non-2xx responses


# --- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, errors) from the output of ``wrk --latency``."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no {pattern!r} in wrk's output:\n{output}")
        return match

    requests_per_second = float(find(r"^Requests/sec:\s+([\d.]+)").group(1))
    p50 = find(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$")
    p99 = find(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$")
    errors = 0
    socket_errors = re.search(r"Socket errors: (.*)$", output, re.MULTILINE)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return requests_per_second, _ms(*p50.groups()), _ms(*p99.groups()), errors


def pinned(command: list[str], cpu: int | None) -> list[str]:
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def run_wrk(url: str, args: argparse.Namespace, seconds: float, cpu: int | None) -> str:
    command = [
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(args.connections),
        "--duration",
        f"{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        url,
    ]
    done = subprocess.run(pinned(command, cpu), capture_output=True, text=True, check=True)
    return done.stdout


# --- the server -----------------------------------------------------------------------------


def busy_seconds(cpu: int | None) -> float:
    """CPU seconds that core ``cpu`` (None: all cores) has spent busy since boot (Linux)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    try:
        with open("/proc/stat") as stat:
            line = next(line for line in stat if line.split()[0] == name)
    except (OSError, StopIteration):
        return 0.0
    fields = [int(field) for field in line.split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, not guests


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its threads so far (Linux), else 0."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerExited(RuntimeError):
    pass


@dataclass
class Server:
    """uvicorn serving one app of fastapi_apps on 127.0.0.1, in its own process."""

    port: int
    process: subprocess.Popen[bytes]
    log: IO[str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        """Wait until ``path`` answers with the three results every route returns."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerExited(f"the server exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url(path), timeout=5) as response:
                    body = json.load(response)
                if len(body["results"]) != 3:
                    raise RuntimeError(f"{path} answered {body!r}")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """End the server by its pid: SIGTERM, and SIGKILL if it has not exited in 20 s."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        output = self.output()
        if "Traceback" in output or "ERROR" in output:
            print(f"  (the server logged errors:)\n{output}", file=sys.stderr)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving(app: str, cpu: int | None) -> Iterator[Server]:
    """Start uvicorn on a free port; yield it; end it by its pid.

    Not ``uvicorn --fd`` with a socket bound here: uvicorn takes such a socket for a Unix
    one, so asyncio does not set TCP_NODELAY on its connections, and each response waits
    ~40 ms for a delayed ACK (p50 48 ms instead of 11 ms here).
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            f"fastapi_apps:{app}",
            "--app-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--workers",
            "1",
            "--loop",
            "asyncio",
            "--http",
            "httptools",
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        process = subprocess.Popen(
            pinned(command, cpu), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        server = Server(int(command[command.index("--port") + 1]), process, log)
        try:
            yield server
        finally:
            server.stop()


def measure(variant: Variant, args: argparse.Namespace) -> Run:
    for attempt in range(3):
        with serving(variant.app, args.server_cpu) as server:
            try:
                server.wait_ready(variant.path)
            except ServerExited:
                if attempt == 2:
                    raise
                continue  # most likely another process took the port first: another one
            url = server.url(variant.path)
            run_wrk(url, args, args.warmup, args.wrk_cpu)
            server_before = cpu_seconds(server.process.pid)
            wrk_before, busy_before = children_cpu_seconds(), busy_seconds(args.server_cpu)
            started = time.monotonic()
            output = run_wrk(url, args, args.duration, args.wrk_cpu)
            elapsed = time.monotonic() - started
            busy = busy_seconds(args.server_cpu) - busy_before
            served = cpu_seconds(server.process.pid) - server_before
            loaded = children_cpu_seconds() - wrk_before  # wrk has been reaped, the server not
        requests_per_second, p50, p99, errors = parse_wrk(output)
        if args.server_cpu is None:
            other = max(0.0, busy - served - loaded) / elapsed
        else:  # what else ran on the server's core: all the server's threads are pinned there
            other = max(0.0, busy - served) / elapsed
        return Run(requests_per_second, p50, p99, served / elapsed, other, errors)
    raise AssertionError("unreachable")


# --- report ---------------------------------------------------------------------------------


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def print_header(args: argparse.Namespace, load_before: str) -> None:
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("uvicorn", "fastapi", "starlette", "anyio", "anyfork")
    )
    cores = os.cpu_count() or 1
    print(f"Python {platform.python_version()}, {versions}; {cores} cores")
    print(
        f"uvicorn: 1 worker, asyncio loop, httptools; wrk: 1 thread, {args.connections} "
        f"connections, {args.duration:g} s after {args.warmup:g} s of warm-up, a fresh server "
        f"each time; {args.rounds} rounds, forwards then backwards"
    )
    if args.server_cpu is None:
        contention = "not pinned: the server and wrk share the cores"
    else:
        contention = f"server pinned to CPU {args.server_cpu}, wrk to CPU {args.wrk_cpu}"
    print(
        f"CPU: {contention}; other work on the machine competes with both (1-minute load "
        f"average {load_before} before, {load_average()} after)"
    )
    where = "on the server's core" if args.server_cpu is not None else "on any core, but wrk"
    print(
        f"server / others: CPU cores used during the load by the server, and by other processes "
        f"{where} (medians); others above ~0.1 means the server had to share its CPU"
    )
    print(
        f"worker threads: anyfork {anyfork.configure().worker_threads}, asyncio.to_thread the "
        f"loop's default "
        f"executor ({min(32, cores + 4)}), anyio.to_thread anyio's default limiter (40)"
    )


def print_results(results: dict[str, list[Run]]) -> None:
    for group, title in GROUPS.items():
        print()
        print(title)
        print(
            f"  {'variant':30} {'req/s best':>10} {'median':>7} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'server':>6} {'others':>6} {'errors':>6}  req/s of each round"
        )
        for variant in (v for v in VARIANTS if v.group == group):
            runs = results[variant.label]
            throughputs = [run.requests_per_second for run in runs]
            print(
                f"  {variant.label:30} {max(throughputs):10.0f} "
                f"{statistics.median(throughputs):7.0f} "
                f"{statistics.median(run.p50_ms for run in runs):7.1f} "
                f"{statistics.median(run.p99_ms for run in runs):7.1f} "
                f"{statistics.median(run.server_cpu for run in runs):6.2f} "
                f"{statistics.median(run.other_cpu for run in runs):6.2f} "
                f"{sum(run.errors for run in runs):6d}  "
                + " ".join(f"{throughput:.0f}" for throughput in throughputs)
            )


def print_targets(results: dict[str, list[Run]]) -> None:
    print()
    print("anyfork's throughput / the alternative's (median of the rounds; best-of in brackets):")
    for _, ours, theirs, target in TARGETS:
        mine = [run.requests_per_second for run in results[ours]]
        other = [run.requests_per_second for run in results[theirs]]
        ratio = statistics.median(mine) / statistics.median(other)
        line = f"  {ours} / {theirs}: {ratio:.2f} ({max(mine) / max(other):.2f})"
        if target is not None:
            line += f"  target >= {target:.2f}: {'met' if ratio >= target else 'MISSED'}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: 2 s, 2 rounds")
    parser.add_argument("--duration", type=float, help="seconds of load per run (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (default 2)")
    parser.add_argument("--rounds", type=int, help="runs of each variant (default 3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk")
    args = parser.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    args.rounds = max(2, args.rounds or (2 if args.quick else 3))

    if shutil.which("wrk") is None:
        print(INSTALL_WRK + "; skipping the FastAPI load benchmark")
        return
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not args.no_pin and len(cpus) >= 2 and shutil.which("taskset"):
        args.server_cpu, args.wrk_cpu = cpus[0], cpus[1]
    else:
        args.server_cpu = args.wrk_cpu = None

    load_before = load_average()
    results: dict[str, list[Run]] = {variant.label: [] for variant in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            results[variant.label].append(measure(variant, args))
    print_header(args, load_before)
    print_results(results)
    print_targets(results)


if __name__ == "__main__":
    main()
