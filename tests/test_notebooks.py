"""In a Jupyter notebook, cells run on the kernel's asyncio loop, in its main thread, so
blocking waits there follow the loop-thread rule of async apps: a forward that forks sync
branches and waits for them runs them in the cell, like torch.jit.wait outside TorchScript;
``await`` (top-level in a cell) gives parallelism; anything a blocking wait would have to
wait for raises WouldBlockError, telling the user to await it.

The notebook tests drive a real ipykernel with jupyter_client, one kernel for the module,
started with this interpreter; the last tests run the same cells without ipykernel, in a
stand-in kernel (tests/notebook_kernel.py).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import queue
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Not installed on free-threaded Python (no free-threaded wheel): see noxfile.py.
pytest.importorskip("jupyter_client")

from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.utils import ensure_event_loop

from .conftest import run_notebook_cells, without_slow_steps_under_the_bound

ROOT = Path(__file__).resolve().parent.parent

# Bounds for a 2-core machine shared with other test runs: a kernel starts in 1-3 s and these
# cells take milliseconds when it is idle.
KERNEL_START_TIMEOUT = 60
CELL_TIMEOUT = 30
SHUTDOWN_TIMEOUT = 10

pytestmark = pytest.mark.timeout(KERNEL_START_TIMEOUT + 4 * CELL_TIMEOUT)


@dataclass
class Cell:
    """What a notebook shows for one executed cell."""

    source: str
    status: str = ""
    stdout: str = ""
    stderr: str = ""
    error: tuple[str, str] | None = None  # (ename, evalue)

    def printed(self) -> Any:
        """The one Python literal the cell printed."""
        assert self.error is None, self.error
        return ast.literal_eval(self.stdout.strip())


class Notebook:
    """A front end's view of a running kernel: executes cells and collects their output."""

    def __init__(self, client: BlockingKernelClient, log: Path) -> None:
        self.client = client
        self.log = log
        self._log_read = 0

    def run(self, source: str) -> Cell:
        """Execute one cell and return its outputs; fail on anything written to stderr or
        logged at WARNING or above in the kernel."""
        cell = Cell(textwrap.dedent(source))
        deadline = time.monotonic() + CELL_TIMEOUT
        msg_id = self.client.execute(cell.source, allow_stdin=False)
        idle = False
        while not idle:
            message = self._next(self.client.get_iopub_msg, deadline, cell)
            content = message["content"]
            mine = message["parent_header"].get("msg_id") == msg_id
            kind = message["msg_type"]
            if kind == "stream" and content["name"] == "stderr":
                cell.stderr += content["text"]  # any cell's: stray output counts too
            elif mine and kind == "stream":
                cell.stdout += content["text"]
            elif mine and kind == "error":
                cell.error = (content["ename"], content["evalue"])
            elif mine and kind == "status":
                idle = content["execution_state"] == "idle"
        while True:
            reply = self._next(self.client.get_shell_msg, deadline, cell)
            if reply["parent_header"].get("msg_id") == msg_id:
                cell.status = reply["content"]["status"]
                break
        assert cell.stderr == "", f"the cell wrote to stderr:\n{cell.stderr}"
        logged = self.newly_logged()
        assert logged == "", f"the kernel logged:\n{logged}"
        return cell

    def _next(self, get: Any, deadline: float, cell: Cell) -> dict[str, Any]:
        try:
            message: dict[str, Any] = get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise TimeoutError(f"no answer within {CELL_TIMEOUT} s to the cell:\n{cell}") from None
        return message

    def newly_logged(self) -> str:
        """Records at WARNING or above logged in the kernel since the last call."""
        if not self.log.exists():  # the first cell creates it
            return ""
        with self.log.open() as log:
            log.seek(self._log_read)
            text = log.read()
            self._log_read = log.tell()
        return text

    def wait_until(self, condition: str) -> None:
        """Run a cell printing ``condition`` until it prints True, letting the kernel's loop
        run in between (as it does while a user reads the last output)."""
        deadline = time.monotonic() + CELL_TIMEOUT
        while not self.run(f"print(repr(bool({condition})))").printed():
            assert time.monotonic() < deadline, f"{condition} stayed false"
            time.sleep(0.02)


# The first cell of every session. Records at WARNING or above from any logger (anyfork's,
# asyncio's "Task exception was never retrieved", warnings through py.warnings) go to a file
# the tests read, not only to the cell's stderr.
PRELUDE = """
import logging, os, sys
_handler = logging.FileHandler({log!r})
_handler.setLevel(logging.WARNING)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger().addHandler(_handler)
logging.captureWarnings(True)

import asyncio, threading
import anyfork

print(repr((sys.executable, anyfork.__file__, threading.current_thread().name, os.getpid())))
"""


def kernel_spec(directory: Path) -> KernelSpecManager:
    """A kernel spec that runs ipykernel with the interpreter running the tests, whatever
    kernels the machine has installed (its "python3" may be another interpreter)."""
    spec = directory / "kernels" / "anyfork-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "anyfork tests", "language": "python"})
    )
    return KernelSpecManager(kernel_dirs=[str(directory / "kernels")])


def close_the_event_loop_jupyter_client_left() -> None:
    """jupyter_client's blocking API runs its coroutines on an event loop that jupyter_core
    makes for the calling thread, sets as the thread's current loop and never closes: close
    it, so that the tests after these find the main thread as they would without them."""
    ensure_event_loop().close()  # the loop it made, still open (or a new one, closed at once)
    asyncio.set_event_loop(None)


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def notebook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notebook]:
    directory = tmp_path_factory.mktemp("kernel")
    manager = KernelManager(
        kernel_name="anyfork-tests",
        kernel_spec_manager=kernel_spec(directory),
        connection_file=str(directory / "connection.json"),
        # Local sockets: over TCP, ipykernel 7 warns that the traffic is not encrypted.
        transport="ipc",
        ip=str(directory / "ipc"),
        shutdown_wait_time=SHUTDOWN_TIMEOUT,
    )
    env = dict(os.environ)
    # The user's IPython and Jupyter settings (history database, startup files) stay out.
    env["IPYTHONDIR"] = str(directory / "ipython")
    env["JUPYTER_CONFIG_DIR"] = str(directory / "jupyter")
    kernel_output = directory / "kernel-output.txt"
    client: BlockingKernelClient | None = None
    pid: int | None = None
    with kernel_output.open("w") as output:
        try:
            manager.start_kernel(stdout=output, stderr=output, cwd=str(ROOT), env=env)
            assert manager.provisioner is not None
            pid = manager.provisioner.pid
            client = manager.client()
            client.start_channels()
            client.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
            session = Notebook(client, directory / "kernel-log.txt")
            kernel = session.run(PRELUDE.format(log=str(session.log)))
            # This interpreter, this checkout's anyfork, cells in the main thread, and the pid
            # that the shutdown check watches.
            anyfork_file = str(ROOT / "src" / "anyfork" / "__init__.py")
            assert kernel.printed() == (sys.executable, anyfork_file, "MainThread", pid)
            yield session
        finally:
            try:
                if client is not None:
                    client.stop_channels()
                if manager.has_kernel:
                    manager.shutdown_kernel(now=False)  # asks first; kills after the wait time
            finally:
                close_the_event_loop_jupyter_client_left()
                if pid is not None:
                    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
                    while not process_is_gone(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if not process_is_gone(pid):
                        os.kill(pid, signal.SIGKILL)
                        pytest.fail(f"the kernel process {pid} was still running after shutdown")
    # What the kernel printed outside any cell: its start, its shutdown and interpreter exit
    # (where forks still pending would be reported), and nothing logged by then.
    assert kernel_output.read_text() == ""
    assert session.newly_logged() == ""


# --- (a) fork and wait in one cell ----------------------------------------------------------

FORWARD = """
ran_in = []

def branch(x):
    ran_in.append((x, threading.get_ident()))
    return x * x

def forward(xs):
    futures = [anyfork.fork(branch, x) for x in xs]
    return {wait}
"""

WAITS = {
    "wait": "sum(anyfork.wait(future) for future in futures)",
    "wait_all": "sum(anyfork.wait_all(futures))",
    "Future.wait": "sum(future.wait() for future in futures)",
}

CALL_FORWARD = """
print(repr((forward([1, 2, 3]), ran_in, threading.get_ident())))
"""


@pytest.mark.parametrize("wait", WAITS.values(), ids=WAITS.keys())
def test_a_forward_that_forks_and_waits_runs_its_branches_in_the_cell(
    notebook: Notebook, wait: str
) -> None:
    notebook.run(FORWARD.format(wait=wait))
    result, ran_in, cell_thread = notebook.run(CALL_FORWARD).printed()
    assert result == 14
    # In the caller, on the kernel's thread, each branch exactly once (wait_all runs them
    # from the last one back).
    assert sorted(ran_in) == [(1, cell_thread), (2, cell_thread), (3, cell_thread)]
    assert notebook.run("print(repr(len(ran_in)))").printed() == 3  # and never again later


# --- (b) await in a cell gives parallelism ------------------------------------------------------

AWAIT_SIDE_BY_SIDE = """
barrier = threading.Barrier(2)

def meet(side):
    barrier.wait(timeout=10)  # returns only once both forks run at the same time
    return side, threading.get_ident()

left, right = anyfork.fork(meet, "left"), anyfork.fork(meet, "right")
(left_side, left_thread), (right_side, right_thread) = await left, await right
print(repr((left_side, right_side, len({left_thread, right_thread, threading.get_ident()}))))
"""


def test_awaiting_sync_forks_in_a_cell_runs_them_side_by_side(notebook: Notebook) -> None:
    # Two worker threads, neither of them the kernel's.
    assert notebook.run(AWAIT_SIDE_BY_SIDE).printed() == ("left", "right", 3)


FORKED_FORWARD = """
meeting = threading.Barrier(3)

def meet_the_others(x):
    meeting.wait(timeout=10)  # returns only once all three branches run at the same time
    return x

def forward_side_by_side(xs):  # an unchanged forward: fork, then wait
    futures = [anyfork.fork(meet_the_others, x) for x in xs]
    return sum(anyfork.wait(future) for future in futures)

print(repr(await anyfork.fork(forward_side_by_side, [1, 2, 3])))
"""


def test_awaiting_a_forked_forward_runs_its_branches_side_by_side(notebook: Notebook) -> None:
    # In the worker thread the forward runs in, its forks start on the pool at once and its
    # waits block that thread only.
    assert notebook.run(FORKED_FORWARD).printed() == 6


# --- (c) across cells --------------------------------------------------------------------------


def test_a_sync_fork_from_an_earlier_cell_runs_on_the_worker_pool_and_is_awaited_later(
    notebook: Notebook,
) -> None:
    notebook.run(
        """
        def where(x):
            return x * x, threading.get_ident()

        earlier = anyfork.fork(where, 4)
        """
    )
    value, thread = notebook.run("print(repr(await earlier))").printed()
    assert value == 16
    assert thread != notebook.run("print(repr(threading.get_ident()))").printed()


def test_a_blocking_wait_on_a_sync_fork_still_running_from_an_earlier_cell_says_to_await(
    notebook: Notebook,
) -> None:
    notebook.run(
        """
        started, release = threading.Event(), threading.Event()

        def held():
            started.set()
            release.wait(timeout=20)
            return "released"

        running = anyfork.fork(held)
        """
    )
    notebook.wait_until("started.is_set()")  # after the cell, on the worker pool

    blocked = notebook.run("anyfork.wait(running)")

    assert blocked.status == "error"
    assert blocked.error is not None
    name, message = blocked.error
    assert name == "WouldBlockError"
    assert "use 'await fut'" in message
    assert notebook.run("release.set()\nprint(repr(await running))").printed() == "released"
    # Done, a future gives its value to a blocking wait too.
    assert notebook.run("print(repr(anyfork.wait(running)))").printed() == "released"


def test_a_coroutine_fork_keeps_running_on_the_kernel_loop_between_cells(
    notebook: Notebook,
) -> None:
    notebook.run(
        """
        ticks = []

        async def tick(times):
            while len(ticks) < times:
                ticks.append(len(ticks))
                await asyncio.sleep(0.01)
            return len(ticks)

        ticking = anyfork.fork(tick, 5)
        """
    )
    # No cell awaits it: the kernel's loop runs it while it waits for the next cell.
    notebook.wait_until("ticking.done()")
    assert notebook.run("print(repr((await ticking, ticks)))").printed() == (5, [0, 1, 2, 3, 4])
    assert notebook.run("print(repr(anyfork.wait(ticking)))").printed() == 5


def test_a_scope_at_the_top_level_of_a_cell_ends_after_its_forks(notebook: Notebook) -> None:
    cell = notebook.run(
        """
        audited = []

        async def audit(event):
            await asyncio.sleep(0.05)
            audited.append(event)

        async with anyfork.scope():
            anyfork.fork(audit, "viewed")  # a task on the kernel's loop
            anyfork.fork(audited.append, "synced")  # on the worker pool
        print(repr(sorted(audited)))
        """
    )
    assert cell.printed() == ["synced", "viewed"]


# --- (d) blocking on a coroutine fork, or with a timeout, says to await ---------------------

ANSWER = """
async def answer():
    await asyncio.sleep(0.01)
    return 42

answering = anyfork.fork(answer)
"""

BLOCKING_WAITS = {
    "wait": "anyfork.wait(answering)",
    "wait_all": "anyfork.wait_all([answering])",
    "Future.wait": "answering.wait()",
}


@pytest.mark.parametrize("blocking_wait", BLOCKING_WAITS.values(), ids=BLOCKING_WAITS.keys())
def test_a_blocking_wait_on_a_coroutine_fork_in_a_cell_says_to_await(
    notebook: Notebook, blocking_wait: str
) -> None:
    blocked = notebook.run(ANSWER + blocking_wait)

    assert blocked.status == "error"
    assert blocked.error is not None
    name, message = blocked.error
    assert name == "WouldBlockError"
    assert "use 'await fut'" in message
    assert notebook.run("print(repr(await answering))").printed() == 42


def test_a_timed_wait_in_a_cell_says_to_await(notebook: Notebook) -> None:
    notebook.run("def square(x):\n    return x * x")

    blocked = notebook.run("timed = anyfork.fork(square, 3)\nanyfork.wait(timed, timeout=5)")

    assert blocked.error is not None
    assert blocked.error[0] == "WouldBlockError"
    assert notebook.run("print(repr(await timed))").printed() == 9


# --- the same cells without ipykernel ------------------------------------------------------------

PRELUDE_WITHOUT_LOGGING = "import asyncio, threading\nimport anyfork\n"


def test_a_forward_that_forks_and_waits_runs_in_the_cell_of_a_stand_in_kernel() -> None:
    result = run_notebook_cells(
        [
            PRELUDE_WITHOUT_LOGGING,
            FORWARD.format(wait=WAITS["wait"]),
            CALL_FORWARD,
            AWAIT_SIDE_BY_SIDE,
        ]
    )
    assert result.returncode == 0, result.stderr
    assert without_slow_steps_under_the_bound(result.stderr) == ""
    forward, side_by_side = result.stdout.splitlines()
    total, ran_in, cell_thread = ast.literal_eval(forward)
    assert total == 14
    assert ran_in == [(1, cell_thread), (2, cell_thread), (3, cell_thread)]
    assert ast.literal_eval(side_by_side) == ("left", "right", 3)


def test_a_blocking_wait_on_a_coroutine_fork_says_to_await_in_a_stand_in_kernel() -> None:
    result = run_notebook_cells(
        [
            PRELUDE_WITHOUT_LOGGING,
            ANSWER + BLOCKING_WAITS["wait"],
            "print(repr(await answering))",
        ]
    )
    assert result.returncode == 1  # one cell raised
    assert "WouldBlockError: " in result.stderr
    assert "use 'await fut'" in result.stderr
    assert result.stdout == "42\n"
