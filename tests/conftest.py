from __future__ import annotations

import contextlib
import gc
import importlib.util
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop does not build on Windows
    uvloop = None

# Dask's test modules import anyfork.dask, which needs distributed: tests_freethreaded leaves it
# out (see NOT_FREE_THREADED in noxfile.py), and the session says so at its end.
collect_ignore_glob = [] if importlib.util.find_spec("distributed") else ["test_dask*.py"]

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param(
        ("asyncio", {"loop_factory": uvloop.new_event_loop if uvloop else None}),
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any blocking call made on a running asyncio event loop, by anyfork or a test.

    blockbuster sees only asyncio loops (uvloop included); trio tests rely on the same
    code paths being exercised on asyncio.
    """
    with blockbuster_ctx(["anyfork", "tests"]) as detector:
        yield detector


@pytest.fixture(autouse=True)
def _restore_config() -> Iterator[None]:
    import anyfork

    before = anyfork.configure()
    yield
    anyfork.configure(
        eager=before.eager,
        worker_threads=before.worker_threads,
        worker_idle_timeout=before.worker_idle_timeout,
        process_workers=before.process_workers,
        exit_timeout=before.exit_timeout,
        debug=before.debug,
        slow_fork_warning=before.slow_fork_warning,
    )


def run_in_thread(func: Callable[[], Any], timeout: float = 30) -> Any:
    """Run func in a plain (non-anyio) thread and return its result or raise its error."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "thread did not finish in time"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_script(
    source: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python program in a fresh interpreter and return what it printed."""
    import os

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


NOTEBOOK_KERNEL = Path(__file__).resolve().parent / "notebook_kernel.py"


def run_notebook_cells(cells: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run notebook cells in order, as a kernel would, in a fresh interpreter (dev mode,
    warnings as errors) and return what they printed; see tests/notebook_kernel.py."""
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(NOTEBOOK_KERNEL), *cells],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# asyncio's debug mode (part of -X dev) logs every loop step that takes over 100 ms. That is a
# wall-time bound, and an oversubscribed machine breaks it with no blocking call made (seen:
# uvicorn's lifespan step, 10 ms when idle, took 142 ms with three test suites running at
# once on 2 cores). Steps under a generous second are let through; longer ones still fail.
# Blocking calls on the loop are caught by blockbuster across the test suite, not by timing.
SLOW_STEP = re.compile(r"^Executing .* took (\d+\.\d+) seconds$")
SLOW_STEP_BOUND = 1.0


def without_slow_steps_under_the_bound(stderr: str) -> str:
    kept = []
    for line in stderr.splitlines(keepends=True):
        slow = SLOW_STEP.match(line.rstrip("\n"))
        if slow is None or float(slow.group(1)) >= SLOW_STEP_BOUND:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def garbage_collector_disabled() -> Iterator[None]:
    """Only reference counting frees objects inside: whatever sits in a cycle stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()  # here, not at a random later point such as pytest's report


def logged_within(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30) -> bool:
    """Whether a record whose message contains ``text`` is captured within ``timeout``
    seconds: reports of failures nobody retrieved are made by a reporter thread, soon after
    the future is freed, never inside the garbage collector."""
    deadline = time.monotonic() + timeout
    while True:
        if any(text in record.getMessage() for record in caplog.records):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
