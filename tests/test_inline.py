"""Work a waiting thread runs itself (work stealing): interrupts reach the waiter, and
fork-and-wait recursion is not bounded by the recursion limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import anyfork

from .conftest import run_in_thread, run_script

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("interrupt", ["KeyboardInterrupt", "SystemExit"])
def test_an_interrupt_raised_by_work_run_inline_reaches_the_waiter_at_once(
    interrupt: str,
) -> None:
    # wait_all runs the queued fork itself; before, the interrupt was only stored in that
    # fork's future and wait_all went on waiting for a fork that never ends.
    result = run_script(
        f"""
        import threading, anyio, anyfork
        anyfork.configure(worker_threads=1)
        release = threading.Event()

        async def never_ends():
            await anyio.sleep_forever()

        def interrupts():
            raise {interrupt}()

        busy = anyfork.fork(release.wait)  # the only worker thread
        forever = anyfork.fork(never_ends)
        queued = anyfork.fork(interrupts)
        try:
            anyfork.wait_all([forever, queued])
        except {interrupt}:
            print("the waiter got it; the future holds it too:",
                  type(queued._exception).__name__)
        release.set()
        forever.cancel()
        """,
        env={"ANYFORK_EXIT_TIMEOUT": "5"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"the waiter got it; the future holds it too: {interrupt}\n"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX only")
@pytest.mark.parametrize("repeat", range(2))
def test_one_ctrl_c_ends_the_exit_join_while_it_runs_a_fork_inline(repeat: int) -> None:
    source = """
        import signal, sys, threading, time, anyio, anyfork
        signal.signal(signal.SIGINT, signal.default_int_handler)  # see test_shutdown.py
        anyfork.configure(worker_threads=1)

        async def never_ends():
            await anyio.sleep_forever()

        def run_by_the_join():
            sys.stdout.write(f"running in {threading.current_thread().name}\\n")
            sys.stdout.flush()
            time.sleep(60)

        anyfork.fork(threading.Event().wait)  # the only worker thread, forever
        anyfork.fork(never_ends)
        anyfork.fork(run_by_the_join)  # queued: the exit join runs it itself
    """
    with subprocess.Popen(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ANYFORK_EXIT_TIMEOUT": "none"},
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "running in MainThread\n"
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("one Ctrl-C did not end the exit join")
        stderr = process.stderr.read() if process.stderr else ""
    assert "3 fork(s) were interrupted at exit (Ctrl-C)" in stderr, stderr
    assert "'run_by_the_join'" in stderr, stderr


def recurse(depth: int) -> int:
    return 0 if depth == 0 else 1 + anyfork.wait(anyfork.fork(recurse, depth - 1))


@pytest.mark.parametrize("depth", [sys.getrecursionlimit() // 4, 3 * sys.getrecursionlimit()])
def test_fork_and_wait_recursion_is_not_bounded_by_the_recursion_limit(depth: int) -> None:
    # Before: a RecursionError at depth ~165 (six frames a level, all in one thread).
    assert run_in_thread(lambda: anyfork.wait(anyfork.fork(recurse, depth))) == depth


def test_deep_fork_and_wait_recursion_in_a_script_with_one_worker_thread() -> None:
    result = run_script(
        """
        import sys, threading, anyfork
        anyfork.configure(worker_threads=1)

        def recurse(depth):
            return 0 if depth == 0 else 1 + anyfork.wait(anyfork.fork(recurse, depth - 1))

        depth = 3 * sys.getrecursionlimit()
        print(anyfork.wait(anyfork.fork(recurse, depth)) == depth)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True\n"
