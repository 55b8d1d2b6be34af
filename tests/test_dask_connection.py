"""anyfork.dask's connection: connecting, failing to connect and connecting again, and the
forks that wait in line meanwhile. Schedulers here are real ones: ``dask scheduler`` and
``dask worker`` processes on 127.0.0.1, started by the test (some only after a first
connection attempt has failed) and ended by pid; or an embedded in-process LocalCluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import dask.config
import pytest

import anyfork
import anyfork.dask
from anyfork.dask import remote

from .conftest import run_script

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LateScheduler:
    """A scheduler address with nothing behind it until :meth:`start` starts a ``dask
    scheduler`` there, and one ``dask worker`` (one thread) for it."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self._directory = directory
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.pop("DASK_SCHEDULER_ADDRESS", None)
        env["DASK_TEMPORARY_DIRECTORY"] = str(self._directory / "scratch")
        for args in (
            [
                *("scheduler", "--host", "127.0.0.1", "--port", str(self.port)),
                *("--no-dashboard", "--dashboard-address", ":0"),
            ],
            ["worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny"],
        ):
            with open(self._directory / f"{args[0]}.log", "wb") as log:
                self._processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dask", *args],
                        cwd=self._directory,  # not the repository: workers cannot import tests.*
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def end(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(10)


@pytest.fixture
def late_scheduler(tmp_path: Path) -> Iterator[LateScheduler]:
    scheduler = LateScheduler(tmp_path)
    try:
        yield scheduler
    finally:
        anyfork.dask.close()
        scheduler.end()


@pytest.fixture(autouse=True)
def _not_connected() -> Iterator[None]:
    anyfork.dask.close()  # from an earlier module
    yield
    anyfork.dask.close()


def _connect_timeout(seconds: float, address: str | None = None) -> Any:
    """How long one connection attempt tries (Dask's ``timeouts.connect``), and the
    scheduler a fork connects to when nobody called ``connect``."""
    options: dict[str, Any] = {"distributed.comm.timeouts.connect": f"{seconds}s"}
    if address is not None:
        options["scheduler-address"] = address
    return dask.config.set(options)


# --- forks waiting in line ---------------------------------------------------------------


async def test_a_fork_cancelled_while_anyfork_connects_never_runs(
    late_scheduler: LateScheduler, tmp_path: Path, anyio_backend: Any
) -> None:
    def write(path: str) -> None:  # local, so sent by value: workers cannot import tests.*
        Path(path).write_text("ran")

    touch = remote(write)
    marker, later = tmp_path / "cancelled-ran", tmp_path / "later-ran"
    with _connect_timeout(120):
        ready = anyfork.dask.connect(late_scheduler.address)
        cancelled = anyfork.fork(touch, str(marker))  # waits in line: nothing to connect to
        assert cancelled.cancel()
        assert cancelled.cancelled()
        await anyio.to_thread.run_sync(late_scheduler.start)
        await ready
        # One worker thread, tasks in the order sent: the cancelled fork, had it been sent,
        # would have run before this one.
        assert await anyfork.fork(touch, str(later)) is None
    assert await anyio.Path(later).exists()
    assert not await anyio.Path(marker).exists()


# --- connect() itself --------------------------------------------------------------------


def test_connect_with_processes_false_runs_forks_in_this_process() -> None:
    # The in-process transport, which anyfork's own error message recommends for scripts
    # without a main guard.
    anyfork.dask.connect(processes=False, n_workers=1, threads_per_worker=2).wait(60)
    assert anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=60) == os.getpid()


@pytest.mark.parametrize(
    ("argument", "error", "message"),
    [
        (123, TypeError, r"address_or_client.*int"),
        (b"tcp://127.0.0.1:8786", TypeError, r"address_or_client.*bytes"),
        ("", ValueError, r"address_or_client.*empty"),
        ("tcp://", ValueError, r"address_or_client.*'tcp://'"),
    ],
)
def test_bad_connect_arguments_fail_at_the_call(
    argument: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        anyfork.dask.connect(argument)
    assert anyfork.pending() == []


# --- failing to connect, then connecting -------------------------------------------------


def test_after_a_failed_connection_connect_succeeds_once_the_scheduler_is_up(
    late_scheduler: LateScheduler,
) -> None:
    with _connect_timeout(1, late_scheduler.address), pytest.raises(OSError):
        anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=60)
    late_scheduler.start()
    with _connect_timeout(120):
        anyfork.dask.connect(late_scheduler.address).wait(150)
        assert anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=60) != os.getpid()


def test_after_a_failed_connection_a_later_fork_connects_again(
    late_scheduler: LateScheduler,
) -> None:
    with _connect_timeout(1, late_scheduler.address):
        with pytest.raises(OSError) as first:
            anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=60)
        # Within the back-off, a fork fails at once, saying when anyfork tries again.
        with pytest.raises(OSError, match="tries again") as second:
            anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=10)
        assert second.value is not first.value
    late_scheduler.start()
    deadline = time.monotonic() + 150
    with _connect_timeout(120, late_scheduler.address):
        while True:  # polls: each fork after the back-off tries once more
            try:
                pid = anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=150)
            except OSError:
                assert time.monotonic() < deadline, "anyfork.dask never connected again"
                time.sleep(0.2)
            else:
                break
    assert pid != os.getpid()


def test_a_failed_connection_nobody_asked_for_logs_no_unretrieved_error() -> None:
    # The script's fork failed and it handled that: nothing else is the user's to retrieve.
    result = run_script(
        """
        import gc
        import os
        import anyfork
        import anyfork.dask

        try:
            anyfork.wait(anyfork.fork(anyfork.dask.remote(os.getpid)), timeout=60)
        except OSError as exc:
            print("failed:", type(exc).__name__)
        anyfork.dask.close()
        gc.collect()
        """,
        env={
            "DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{_free_port()}",  # nothing there
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "failed:" in result.stdout
    assert "never retrieved" not in result.stderr, result.stderr


async def test_each_fork_that_cannot_connect_fails_with_an_error_of_its_own(
    anyio_backend: Any,
) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing there
    errors: list[BaseException] = []
    with _connect_timeout(1, address):
        futures = [anyfork.fork(remote(os.getpid)) for _ in range(200)]
        for future in futures:
            with pytest.raises(OSError) as caught:
                await future
            errors.append(caught.value)
    assert len({id(error) for error in errors}) == len(errors)
    # Each traceback is its own fork's wait, not one that grows with every waiter.
    assert max(len(traceback.extract_tb(error.__traceback__)) for error in errors) < 20
    assert address in str(errors[0])
