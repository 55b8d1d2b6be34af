"""Functions the Dask tests fork onto the cluster: a small module the workers import."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyfork
import anyfork.dask


@anyfork.dask.remote
def add(a: int, b: int) -> int:
    return a + b


@anyfork.dask.remote
def where() -> tuple[int, str]:
    return os.getpid(), threading.current_thread().name


@anyfork.dask.remote
def fail(message: str) -> None:
    raise ValueError(message)


class Unpicklable(Exception):
    """An exception Dask cannot send back: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


@anyfork.dask.remote
def fail_unpicklable(message: str) -> None:
    raise Unpicklable(message)


@anyfork.dask.remote
def touch_after(path: str, delay: float) -> str:
    time.sleep(delay)
    Path(path).write_text("ran")
    return path


@anyfork.dask.remote
def hold_until(path: str, timeout: float = 30, started: str | None = None) -> None:
    """Keep a worker thread busy until ``path`` exists (creating ``started`` first)."""
    if started is not None:
        Path(started).write_text("started")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@anyfork.dask.remote
def nested_sum(n: int) -> int:
    """Fork n inner tasks onto the same cluster and wait for them (blocking, in the task)."""
    inner = [anyfork.fork(add, i, 1) for i in range(n)]
    return sum(anyfork.wait(f) for f in inner)


@anyfork.dask.remote
def die() -> None:
    os._exit(1)


@anyfork.dask.remote
def grad_mode() -> tuple[bool, bool]:
    import torch

    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


@anyfork.dask.remote(resources={"GPU": 1})
def on_gpu_worker() -> str:
    from distributed import get_worker

    return str(get_worker().name)


@anyfork.dask.remote
def worker_name() -> str:
    from distributed import get_worker

    return str(get_worker().name)


@anyfork.dask.remote
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
