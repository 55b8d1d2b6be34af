"""Processes made with ``os.fork`` or multiprocessing's ``fork`` start method: the child
starts with no forks, pool or background loop of its parent's, runs none of the parent's
work, exits promptly, and forks made in it work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import run_script

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform == "win32", reason="os.fork is POSIX only"),
]

# Python 3.12+ warns that forking a multi-threaded process may deadlock the child; the
# scripts fork on purpose, with anyfork's threads running.
QUIET_FORK_WARNING = (
    "import warnings; warnings.filterwarnings('ignore', 'This process', DeprecationWarning)\n"
)


def parent_with_jobs(ledger: Path) -> str:
    """A script prelude: one worker thread, and jobs that log which process ran them."""
    return f"""
import os, sys, threading, time, anyfork
anyfork.configure(worker_threads=1)
LEDGER = {str(ledger)!r}
started = threading.Event()

def job(tag):
    with open(LEDGER, "a") as ledger:
        ledger.write(f"{{tag}} {{os.getpid()}}\\n")
    started.set()
    time.sleep(0.5)
    return tag

async def double(x):
    return 2 * x
"""


def assert_each_job_ran_once_in_one_process(ledger: Path) -> None:
    runs = ledger.read_text().splitlines()
    assert sorted(int(line.split()[0]) for line in runs) == [0, 1, 2]
    assert len({line.split()[1] for line in runs}) == 1  # all in the parent


@pytest.mark.parametrize("repeat", range(2))
def test_a_child_made_by_os_fork_runs_none_of_its_parents_forks(
    tmp_path: Path, repeat: int
) -> None:
    ledger = tmp_path / "ledger.txt"
    result = run_script(
        QUIET_FORK_WARNING
        + parent_with_jobs(ledger)
        + """

def triple(x):
    return 3 * x

anyfork.wait(anyfork.fork(double, 1))  # the parent's background loop is up
futures = [anyfork.fork(job, tag) for tag in range(3)]  # one running, two queued
started.wait(10)
pid = os.fork()
if pid == 0:
    began = time.monotonic()
    sys.stdout.write(f"child coroutine {anyfork.wait(anyfork.fork(double, 21))}\\n")
    sys.stdout.write(f"child sync {anyfork.wait(anyfork.fork(triple, 14))}\\n")
    sys.stdout.write(f"child sees the parent's forks cancelled {futures[2].cancelled()}\\n")
    sys.stdout.flush()
    sys.exit(0)  # through the exit join, which must find nothing of the parent's
else:
    began = time.monotonic()
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(f"child exit status {status} after {time.monotonic() - began:.1f} s\\n")
    sys.stdout.write(f"parent {anyfork.wait_all(futures)}\\n")
""",
        env={"ANYFORK_EXIT_TIMEOUT": "30"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "child coroutine 42" in lines
    assert "child sync 42" in lines
    assert "child sees the parent's forks cancelled True" in lines
    assert "parent [0, 1, 2]" in lines
    exit_line = next(line for line in lines if line.startswith("child exit status"))
    assert exit_line.startswith("child exit status 0 after")
    assert float(exit_line.split()[-2]) < 10, exit_line  # not the 30 s exit bound
    assert_each_job_ran_once_in_one_process(ledger)
    assert result.stderr == ""


@pytest.mark.parametrize("repeat", range(2))
def test_a_multiprocessing_fork_child_works_and_runs_no_parent_work(
    tmp_path: Path, repeat: int
) -> None:
    ledger = tmp_path / "ledger.txt"
    result = run_script(
        QUIET_FORK_WARNING
        + parent_with_jobs(ledger)
        + """
import multiprocessing

def child(queue):
    queue.put(anyfork.wait(anyfork.fork(double, 20)) + anyfork.wait(anyfork.fork(len, "ab")))

if __name__ == "__main__":
    futures = [anyfork.fork(job, tag) for tag in range(3)]
    started.wait(10)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    began = time.monotonic()
    process.start()
    sys.stdout.write(f"child result {queue.get(timeout=30)}\\n")
    process.join(30)
    sys.stdout.write(f"child exit {process.exitcode} after {time.monotonic() - began:.1f} s\\n")
    sys.stdout.write(f"parent {anyfork.wait_all(futures)}\\n")
""",
        env={"ANYFORK_EXIT_TIMEOUT": "30"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "child result 42" in lines
    assert "parent [0, 1, 2]" in lines
    exit_line = next(line for line in lines if line.startswith("child exit"))
    assert exit_line.startswith("child exit 0 after")
    assert float(exit_line.split()[-2]) < 10, exit_line
    assert_each_job_ran_once_in_one_process(ledger)
    assert result.stderr == ""


def test_the_parent_keeps_working_after_forking_children() -> None:
    result = run_script(
        QUIET_FORK_WARNING
        + """
import os, anyfork

async def double(x):
    return 2 * x

for round in range(3):
    before = anyfork.wait_all([anyfork.fork(double, round), anyfork.fork(abs, -round)])
    pid = os.fork()
    if pid == 0:
        os._exit(0 if anyfork.wait(anyfork.fork(double, 5)) == 10 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    after = anyfork.wait_all([anyfork.fork(double, round), anyfork.fork(abs, -round)])
    assert before == after == [2 * round, round], (before, after)
print("ok")
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
    assert result.stderr == ""


# os.fork (or multiprocessing's fork) where a loop is in reach of the forking code: inside a
# scope, in a sync fork made in async code, in an anyio worker thread (as a FastAPI 'def'
# endpoint runs). Before, the child's coroutine forks went to the parent's loop, which does
# not run in the child (cancelled at once, or never run), and pending() in the child listed
# the parent's forks.
CHILD_OF_ASYNC_CODE = """
import multiprocessing, os, sys, anyio, anyfork

where, backend = sys.argv[1], sys.argv[2]

async def double(x):
    await anyio.sleep(0)
    return 2 * x

def in_child():
    try:
        inherited = len(anyfork.pending())
        coroutine = anyfork.wait(anyfork.fork(double, 21), timeout=20)
        sync = anyfork.wait(anyfork.fork(abs, -42), timeout=20)
        print(f"child {coroutine} {sync} inherited {inherited}", flush=True)
    except BaseException as exc:
        print(f"child failed {exc!r}", flush=True)

def make_child():
    if where.startswith("multiprocessing"):
        process = multiprocessing.get_context("fork").Process(target=in_child)
        process.start()
        process.join(60)
        return process.exitcode
    pid = os.fork()
    if pid == 0:
        in_child()
        os._exit(0)
    return os.waitpid(pid, 0)[1]

async def main():
    async with anyfork.scope():
        anyfork.fork(anyio.sleep, 3)  # a coroutine fork of the parent's, pending throughout
        if where.endswith("in a scope"):
            status = make_child()
        elif where.endswith("in a sync fork"):
            status = await anyfork.fork(make_child)
        else:  # an anyio worker thread, as a FastAPI 'def' endpoint's
            status = await anyio.to_thread.run_sync(make_child)
    print(f"parent {status}", flush=True)

anyio.run(main, backend=backend)
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    "where",
    [
        "os.fork in a scope",
        "os.fork in a sync fork",
        "os.fork in a worker thread",
        "multiprocessing in a scope",
        "multiprocessing in a sync fork",
    ],
)
def test_a_child_forked_from_async_code_starts_clean(where: str, backend: str) -> None:
    result = run_script(
        QUIET_FORK_WARNING
        + f"import sys; sys.argv[1:] = [{where!r}, {backend!r}]\n"
        + CHILD_OF_ASYNC_CODE,
        env={"ANYFORK_EXIT_TIMEOUT": "10"},
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["child 42 42 inherited 0", "parent 0"], (
        result.stdout + result.stderr
    )
