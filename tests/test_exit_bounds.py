"""Bounds that hold whatever the work does: timed waits, the exit bound, forks made at exit.
Each in a fresh interpreter, where the script pool is sized by the test."""

from __future__ import annotations

import time

import pytest

from .conftest import run_script, without_slow_steps_under_the_bound

pytestmark = pytest.mark.timeout(120)


def test_a_timed_wait_never_runs_a_queued_fork_inline() -> None:
    # One worker, busy; the fork waited for is queued. Run inline, it would take 3 s.
    result = run_script(
        """
        import threading, time, anyfork
        anyfork.configure(worker_threads=1)
        release = threading.Event()
        busy = anyfork.fork(release.wait, 30)
        slow = anyfork.fork(time.sleep, 3)
        began = time.monotonic()
        try:
            anyfork.wait(slow, timeout=0.5)
        except TimeoutError:
            print(f"wait timed out after {time.monotonic() - began:.2f} s")
        began = time.monotonic()
        try:
            anyfork.wait_all([slow, anyfork.fork(time.sleep, 3)], timeout=0.5)
        except TimeoutError:
            print(f"wait_all timed out after {time.monotonic() - began:.2f} s")
        release.set()
        anyfork.wait_all([busy, slow])
        """
    )
    assert result.returncode == 0, result.stderr
    waited = [float(line.split()[-2]) for line in result.stdout.splitlines()]
    assert len(waited) == 2, result.stdout
    assert all(seconds < 2.0 for seconds in waited), result.stdout


def test_the_exit_bound_holds_with_queued_forks_the_join_could_run_inline() -> None:
    started = time.monotonic()
    result = run_script(
        """
        import time, anyfork
        anyfork.configure(worker_threads=1)
        anyfork.fork(time.sleep, 20)
        anyfork.fork(time.sleep, 20)
        """,
        env={"ANYFORK_EXIT_TIMEOUT": "2"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "2 fork(s) did not finish within the exit bound of 2.0 seconds" in result.stderr
    assert elapsed < 10, f"exit took {elapsed:.1f} s with a bound of 2 s"


def test_the_exit_bound_holds_when_a_coroutine_blocks_the_background_loop() -> None:
    started = time.monotonic()
    result = run_script(
        """
        import time, anyfork

        async def blocks_its_loop():
            time.sleep(30)

        anyfork.fork(blocks_its_loop)
        """,
        env={"ANYFORK_EXIT_TIMEOUT": "1"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "1 fork(s) did not finish within the exit bound of 1.0 seconds" in result.stderr
    assert "the background event loop did not stop" in result.stderr
    assert elapsed < 10, f"exit took {elapsed:.1f} s with a bound of 1 s"


@pytest.mark.parametrize("repeat", range(2))
def test_a_sync_fork_running_at_exit_that_forks_its_first_coroutine_gets_its_result(
    repeat: int,
) -> None:
    # The background loop starts during the exit join here; Python 3.12 starts no thread
    # then, and the coroutine runs in the forking thread instead.
    result = run_script(
        """
        import sys, anyfork
        from anyfork._exit import exit_join_started

        async def double(x):
            return 2 * x

        def late():
            exit_join_started.wait(30)
            return anyfork.wait(anyfork.fork(double, 21)) + anyfork.wait(anyfork.fork(abs, -1))

        anyfork.fork(late).add_done_callback(
            lambda f: sys.stdout.write(f"result {f.value()}\\n")
        )
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "result 43\n"
    assert without_slow_steps_under_the_bound(result.stderr) == ""


def test_forking_from_an_atexit_handler_before_any_fork_raises_shutdown_error() -> None:
    result = run_script(
        """
        import atexit, sys, anyfork

        def too_late():
            for func in (abs, anyfork.wait_async):
                try:
                    anyfork.fork(func, -1)
                except anyfork.ShutdownError as exc:
                    sys.stdout.write(f"refused: {exc}\\n")

        atexit.register(too_late)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert all("already shutting down" in line for line in lines)
    assert result.stderr == ""


def test_nested_work_at_exit_still_finds_a_thread_after_idle_threads_timed_out() -> None:
    # At exit a sync fork waits for a coroutine fork of the background loop, which awaits
    # a sync fork: that one needs a second worker thread. Python 3.12 starts no thread at
    # exit, so the threads the script used before must still be there, idle timeout or not.
    result = run_script(
        """
        import sys, threading, time, anyfork
        from anyfork._exit import exit_join_started
        anyfork.configure(worker_idle_timeout=0.05, exit_timeout=20)

        async def inner():
            return await anyfork.fork(abs, -1)

        barrier = threading.Barrier(3, timeout=10)
        anyfork.wait_all([anyfork.fork(barrier.wait) for _ in range(3)], timeout=10)
        print(anyfork.fork(inner).wait(timeout=10))
        time.sleep(0.5)  # many idle timeouts

        def outer():
            exit_join_started.wait(30)
            return anyfork.wait(anyfork.fork(inner)) + 1

        anyfork.fork(outer).add_done_callback(
            lambda f: sys.stdout.write(f"result {f.value()}\\n")
        )
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\nresult 2\n"
    assert without_slow_steps_under_the_bound(result.stderr) == ""


@pytest.mark.parametrize("repeat", range(2))
def test_nested_work_at_exit_runs_when_the_only_worker_thread_blocks(repeat: int) -> None:
    # At exit a sync fork, on the one worker thread the script ever had, waits for a
    # coroutine fork that awaits a sync fork. Python 3.12+ starts no thread then: the
    # blocked worker runs the inner sync fork itself, well within the exit bound.
    result = run_script(
        """
        import sys, time, anyfork
        from anyfork._exit import exit_join_started
        anyfork.configure(exit_timeout=30)

        async def inner():
            return await anyfork.fork(abs, -1)

        print(anyfork.fork(inner).wait(timeout=10))  # starts the background loop

        def outer():
            exit_join_started.wait(30)
            started = time.monotonic()
            value = anyfork.wait(anyfork.fork(inner)) + 1
            return value, time.monotonic() - started < 10

        anyfork.fork(outer).add_done_callback(
            lambda f: sys.stdout.write(f"result {f.value()}\\n")
        )
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\nresult (2, True)\n"
    assert without_slow_steps_under_the_bound(result.stderr) == ""
