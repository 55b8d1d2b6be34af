"""Functions the Ray tests fork onto the cluster: a small module the workers import."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyfork
import anyfork.ray


@anyfork.ray.remote
def add(a: int, b: int) -> int:
    return a + b


@anyfork.ray.remote
def pid() -> int:
    return os.getpid()


@anyfork.ray.remote
def fail(message: str) -> None:
    raise ValueError(message)


@anyfork.ray.remote
def touch_after(path: str, delay: float) -> str:
    time.sleep(delay)
    Path(path).write_text("ran")
    return path


@anyfork.ray.remote
def hold_until(path: str, timeout: float = 60, started: str | None = None) -> None:
    """Hold a CPU of the cluster until ``path`` exists (creating ``started`` first)."""
    if started is not None:
        Path(started).write_text("started")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@anyfork.ray.remote
def swallow_interrupt(started: str, seconds: float) -> str:
    """Run for ``seconds``, ignoring the KeyboardInterrupt of Ray's cancel."""
    Path(started).write_text("started")
    deadline = time.monotonic() + seconds
    interrupted = False
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except KeyboardInterrupt:
            interrupted = True
    return "interrupted" if interrupted else "finished"


@anyfork.ray.remote
def nested_sum(n: int) -> int:
    """Fork n inner tasks onto the same cluster and wait for them (blocking, in the task)."""
    inner = [anyfork.fork(add, i, 1) for i in range(n)]
    return sum(anyfork.wait(f) for f in inner)


@anyfork.ray.remote
def die_once_logged(log: str) -> None:
    """Log a run, then kill this worker process (as the OOM killer would)."""
    with open(log, "a") as file:
        file.write("ran\n")
    os.kill(os.getpid(), signal.SIGKILL)


@anyfork.ray.remote
def grad_mode() -> tuple[bool, bool]:
    import torch

    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


@anyfork.ray.remote(resources={"GPU_FAKE": 1})
def on_fake_gpu_node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


@anyfork.ray.remote
def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


@anyfork.ray.remote(resources={"GPU_FAKE": 1})
def die_on_fake_gpu_node(log: str) -> None:
    """Log a run on the node with the fake GPU, then kill this worker process."""
    with open(log, "a") as file:
        file.write("ran\n")
    os.kill(os.getpid(), signal.SIGKILL)
