"""anyfork.dask on a real multi-process cluster, on one machine: ``dask scheduler`` and two
``dask worker`` processes (one with ``--resources GPU=1``) on 127.0.0.1, started here with a
scheduler file and ended by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.config
import pytest

import anyfork
import anyfork.dask
from anyfork.dask import RemoteImportError, remote

from . import dask_tasks as tasks
from .conftest import run_script

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(120)

RECONNECT = 5


@dataclass
class RealCluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]]
    directory: Path


def _dask(*args: str, directory: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(directory / f"{args[0]}-{len(list(directory.iterdir()))}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            cwd=directory,  # not the repository: the workers cannot import tests.*
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(3)  # a worker whose scheduler is gone may not stop on its own
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    directory = tmp_path_factory.mktemp("real-cluster")
    scheduler_file = directory / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DASK_SCHEDULER_ADDRESS")}
    env["DASK_TEMPORARY_DIRECTORY"] = str(directory / "scratch")
    # A worker killed mid-task fails its task at once (KilledWorker), instead of after three.
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "0"
    common = ["--scheduler-file", str(scheduler_file), "--no-dashboard"]
    scheduler = _dask(
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dashboard-address",  # its HTTP server (health, metrics) too: a free port
        ":0",
        *common,
        directory=directory,
        env=env,
    )
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert scheduler.poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        worker_args = ["worker", "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny"]
        for name, extra in (("plain", []), ("gpu", ["--resources", "GPU=1"])):
            workers[name] = _dask(
                *worker_args, "--name", name, *extra, *common, directory=directory, env=env
            )
        address = json.loads(scheduler_file.read_text())["address"]
        anyfork.dask.close()  # from an earlier module
        # How long the client tries to reconnect to a lost scheduler (default 30 s).
        with dask.config.set({"distributed.comm.timeouts.connect": f"{RECONNECT}s"}):
            client = anyfork.dask.connect(address).wait(30)
        client.wait_for_workers(2, timeout=30)
        yield RealCluster(address, scheduler, workers, directory)
    finally:
        anyfork.dask.close()
        for process in (*workers.values(), scheduler):
            _end(process)
    assert all(p.poll() is not None for p in (*workers.values(), scheduler))


def test_resources_route_a_fork_to_the_worker_that_has_them(real_cluster: RealCluster) -> None:
    def worker_name() -> str:
        return str(distributed.get_worker().name)

    on_gpu = remote(resources={"GPU": 1})(worker_name)
    anywhere = remote(worker_name)
    assert anyfork.wait_all([anyfork.fork(on_gpu) for _ in range(4)]) == ["gpu"] * 4
    assert set(anyfork.wait_all([anyfork.fork(anywhere) for _ in range(8)])) <= {"plain", "gpu"}


def test_a_function_the_workers_cannot_import_fails_with_a_clear_error(
    real_cluster: RealCluster,
) -> None:
    # tests.dask_tasks is importable here, not in the workers' environment.
    with pytest.raises(RemoteImportError, match=r"could not load the forked function.*tests"):
        anyfork.wait(anyfork.fork(tasks.add, 1, 2), timeout=30)


def test_a_script_connects_to_the_scheduler_in_dask_scheduler_address(
    real_cluster: RealCluster, tmp_path: Path
) -> None:
    result = run_script(
        """
        import anyfork
        import anyfork.dask
        from distributed import get_worker


        @anyfork.dask.remote
        def name() -> str:
            return str(get_worker().name)


        print(sorted(set(anyfork.wait_all([anyfork.fork(name) for _ in range(6)]))))
        """,
        env={"DASK_SCHEDULER_ADDRESS": real_cluster.address},
    )
    assert result.returncode == 0, result.stderr
    names = eval(result.stdout)
    assert set(names) <= {"plain", "gpu"} and names


def test_sigkill_of_a_worker_mid_task_fails_the_fork(real_cluster: RealCluster) -> None:
    started = real_cluster.directory / "started"

    def report_and_sleep(path: str) -> None:
        Path(path).write_text(str(os.getpid()))
        time.sleep(60)

    future = anyfork.fork(remote(resources={"GPU": 1})(report_and_sleep), str(started))
    deadline = time.monotonic() + 30
    while not started.exists() or not started.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert int(started.read_text()) == real_cluster.workers["gpu"].pid
    os.kill(real_cluster.workers["gpu"].pid, signal.SIGKILL)
    with pytest.raises(distributed.KilledWorker):
        anyfork.wait(future, timeout=30)
    assert not future.cancelled()
    # The other worker still takes forks.
    assert anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=30) != os.getpid()


# Last: it stops the scheduler.
def test_losing_the_scheduler_fails_pending_forks_promptly_and_later_ones_within_a_bound(
    real_cluster: RealCluster,
) -> None:
    def nap(seconds: float) -> None:
        time.sleep(seconds)

    pending = [anyfork.fork(remote(nap), 30) for _ in range(3)]
    client = anyfork.dask.connect().wait(30)
    deadline = time.monotonic() + 30
    while sum(len(keys) for keys in client.processing().values()) < 2:  # both workers busy
        assert time.monotonic() < deadline, "the naps did not start"
        time.sleep(0.05)
    real_cluster.scheduler.kill()  # SIGKILL
    real_cluster.scheduler.wait(10)
    lost = time.monotonic()
    for future in pending:
        with pytest.raises(Exception) as caught:
            anyfork.wait(future, timeout=15)
        assert not future.cancelled()  # it failed: the user did not cancel it
        assert "scheduler-connection-lost" in str(caught.value) or isinstance(
            caught.value, OSError
        ), repr(caught.value)
    failed_after = time.monotonic() - lost
    assert failed_after < 15, failed_after  # not the naps' 30 s, on a loaded machine too

    # While the client tries to reconnect, a new fork waits for that, then fails.
    later = anyfork.fork(remote(os.getpid))
    started = time.monotonic()
    with pytest.raises(distributed.client.FutureCancelledError):
        anyfork.wait(later, timeout=60)
    assert time.monotonic() - started < RECONNECT + 15  # not Dask's default 30 s
    # Once the client has given up, a fork fails at once, saying how to connect again.
    with pytest.raises(RuntimeError, match=r"anyfork.dask.close\(\)"):
        anyfork.wait(anyfork.fork(remote(os.getpid)), timeout=5)
