"""anyfork.ray on a real Ray cluster of two nodes on this machine, reached through RAY_ADDRESS.

The test starts a head (``ray start --head``) and a second node that has a custom resource
(``GPU_FAKE``), each with an isolated temporary directory, explicit token authentication
and ports of their own, and ends every process they started by pid afterwards (found by a
marker in their environment, reparented ones included): never ``ray stop``, which would
kill every Ray on the machine, other tests' embedded ones too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from .test_ray import processes_marked

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path("/proc").exists(), reason="finds Ray's processes in /proc"),
]

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwoNodes:
    def __init__(self, address: str, env: dict[str, str], mark: str, temp_dir: str) -> None:
        self.address = address
        self.env = env
        self.mark = mark
        self.temp_dir = temp_dir


def _start_node(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(
        [RAY, "start", "--disable-usage-stats", "--num-cpus=1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _end_processes(mark: str) -> None:
    """End every process of the cluster, by pid: SIGTERM, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        for pid in processes_marked(mark, timeout=0):
            if pid != os.getpid():
                try:
                    os.kill(pid, sig)
                except OSError:  # gone already
                    pass
        if not processes_marked(mark, timeout=wait):
            return


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    mark = uuid.uuid4().hex
    # Ray puts Unix sockets under it: at most 40 characters.
    temp_dir = tempfile.mkdtemp(prefix="anyfork-ray-", dir="/tmp")
    env = dict(os.environ)
    env.update(
        {
            "ANYFORK_TEST_MARK": mark,  # inherited by every process the nodes start
            # Explicit: a node started without it fails to join after 20 s once an embedded
            # Ray has written ~/.ray/auth_token (token auth is on by default).
            "RAY_AUTH_MODE": "token",
            "PYTHONPATH": os.pathsep.join(sys.path),  # workers import tests.ray_tasks
        }
    )
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    try:
        _start_node(
            [
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                f"--temp-dir={temp_dir}",
            ],
            env,
        )
        address = f"127.0.0.1:{port}"
        _start_node(
            [
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                f"--resources={json.dumps({'GPU_FAKE': 1})}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
            ],
            env,
        )
        yield TwoNodes(address, env, mark, temp_dir)
    finally:
        _end_processes(mark)
        left = processes_marked(mark, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"Ray processes left behind: {left}"
        assert not Path(temp_dir).exists()


def _run_driver(cluster: TwoNodes, source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(source))
    env = dict(cluster.env, RAY_ADDRESS=cluster.address)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )


def test_forks_reach_the_cluster_through_ray_address_and_route_by_resource(
    two_nodes: TwoNodes, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    result = _run_driver(
        two_nodes,
        f"""
        import ray
        import anyfork
        import anyfork.ray
        from tests import ray_tasks as tasks

        if __name__ == "__main__":
            address = anyfork.ray.connect().wait(120)
            print("> address", address.endswith({":" + two_nodes.address.split(":")[1]!r}))
            here = ray.get_runtime_context().get_node_id()  # the head: the driver's node
            forks = [anyfork.fork(tasks.on_fake_gpu_node) for _ in range(3)]
            gpu_nodes = set(anyfork.wait_all(forks))
            print("> routed", len(gpu_nodes) == 1 and here not in gpu_nodes)
            print("> nodes", len(ray.nodes()))
            try:
                anyfork.wait(anyfork.fork(tasks.die_on_fake_gpu_node, {str(log)!r}), timeout=120)
            except ray.exceptions.WorkerCrashedError:
                print("> crashed")
            print("> after", anyfork.wait(anyfork.fork(tasks.add, 1, 1), timeout=120))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Ray's own lines (the raylet's report of the dead worker) come to stdout too.
    said = [line[2:] for line in result.stdout.splitlines() if line.startswith("> ")]
    assert said == [
        "address True",
        "routed True",
        "nodes 2",
        "crashed",
        "after 2",
    ], result.stdout + result.stderr
    assert log.read_text() == "ran\n"  # run once: no silent retry by default
