"""Process forks for tests/test_process.py, in a module of their own: worker processes import
it by name, and it imports nothing heavy (not pytest)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import anyfork


class TaskError(Exception):
    """An error of a process fork's own, to check that its type comes back."""


@anyfork.process
def square(x: int) -> int:
    return x * x


@anyfork.process
def pid() -> int:
    return os.getpid()


@anyfork.process
def fail(message: str) -> None:
    raise TaskError(message)


@anyfork.process
def spin(pid_file: str) -> None:
    """Write this worker's pid, then spin forever (pure Python: only killing stops it)."""
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


@anyfork.process
def touch(path: str, delay: float = 0.0) -> str:
    time.sleep(delay)
    Path(path).write_text("ran")
    return path


@anyfork.process
def exit_now(code: int) -> None:
    os._exit(code)


@anyfork.process
def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@anyfork.process
def lock_result() -> object:
    return threading.Lock()


def _thread_id() -> int:
    return threading.get_ident()


@anyfork.process
def fork_a_thread() -> tuple[int, bool]:
    """A process fork that forks a thread fork and waits for it."""
    ident = anyfork.fork(_thread_id).wait(timeout=30)
    return os.getpid(), ident != threading.get_ident()


@anyfork.process
def grad_enabled() -> tuple[bool, bool]:
    import torch

    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def wait_for_pid(pid_file: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = pid_file.read_text()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        time.sleep(0.01)
    raise AssertionError(f"no worker wrote {pid_file} within {timeout} s")


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended and been reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def dead(pid: int) -> bool:
    """Whether process ``pid`` has ended (reaped, or a zombie waiting to be)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return gone(pid)
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_dead(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` has ended; fails after ``timeout``."""
    started = time.monotonic()
    while not dead(pid):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"process {pid} still running after {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - started


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` is gone; fails after ``timeout``."""
    started = time.monotonic()
    while not gone(pid):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"process {pid} still alive after {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - started
