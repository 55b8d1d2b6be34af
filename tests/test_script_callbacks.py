"""Done callbacks of coroutine forks made in a script: they never run on anyfork's
background loop, so they may block, wait and fork like any script code."""

from __future__ import annotations

import threading

import anyio
import pytest

import anyfork

from .conftest import run_in_thread, run_script, without_slow_steps_under_the_bound

pytestmark = pytest.mark.timeout(60)


def double(x: int) -> int:
    return 2 * x


async def async_parent() -> int:
    await anyio.sleep(0.01)
    return 21


def test_a_callback_of_a_coroutine_fork_in_a_script_may_fork_and_wait() -> None:
    def script() -> int:
        child = anyfork.fork(async_parent).then(
            lambda parent: anyfork.wait(anyfork.fork(double, parent.value()))
        )
        return child.wait()

    assert run_in_thread(script) == 42


def test_callbacks_of_coroutine_forks_in_a_script_run_off_the_background_loop() -> None:
    def script() -> list[str]:
        threads: list[str] = []
        parent = anyfork.fork(async_parent)
        parent.add_done_callback(lambda _: threads.append(threading.current_thread().name))
        done = parent.then(lambda _: threads.append(threading.current_thread().name))
        done.wait()
        return threads

    threads = run_in_thread(script)
    assert len(threads) == 2
    assert "anyfork background loop" not in threads


def test_an_awaiting_task_on_the_background_loop_is_woken_directly() -> None:
    async def awaits_a_sibling() -> int:
        return await anyfork.fork(async_parent) * 2

    assert run_in_thread(lambda: anyfork.fork(awaits_a_sibling).wait()) == 42


def test_the_exit_join_waits_for_callbacks_that_fork() -> None:
    result = run_script(
        """
        import sys, time, anyio, anyfork

        def say(line):
            sys.stdout.write(line + "\\n")

        async def async_parent():
            await anyio.sleep(0.05)
            return 21

        async def async_double(x):
            return 2 * x

        def callback(parent):
            time.sleep(0.2)  # still running when its future's fork is long done
            value = anyfork.wait(anyfork.fork(async_double, parent.value()))
            anyfork.fork(say, f"callback forked and waited: {value}")

        anyfork.fork(async_parent).add_done_callback(callback)
        """
    )
    assert result.returncode == 0, result.stderr
    assert without_slow_steps_under_the_bound(result.stderr) == ""
    assert result.stdout == "callback forked and waited: 42\n"


@pytest.mark.anyio
async def test_callbacks_of_coroutine_forks_on_a_users_loop_still_run_on_that_loop() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    fut = anyfork.fork(async_parent)
    fut.add_done_callback(lambda _: threads.append(threading.get_ident()))
    await fut
    assert threads == [loop_thread]


@pytest.mark.parametrize("how", ["add_done_callback", "then"])
def test_the_exit_join_waits_for_the_done_callbacks_of_a_finished_sync_fork(how: str) -> None:
    # The future is done before its callbacks run, in the worker thread that completed it;
    # the join used to return then, and the interpreter finalized under that daemon thread,
    # cutting the callback short (with torch's to_torch hand-on, it could abort the process).
    result = run_script(
        f"""
        import threading, time, anyfork
        gate = threading.Event()

        def slow_callback(fut):
            time.sleep(0.5)
            print("callback done", fut.value(), flush=True)

        fut = anyfork.fork(gate.wait, 10)
        fut.{how}(slow_callback)
        gate.set()  # the script ends while the worker runs the callback
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "callback done True\n"
    assert result.stderr == ""


def test_the_exit_bound_holds_when_a_done_callback_never_returns() -> None:
    result = run_script(
        """
        import threading, anyfork
        anyfork.configure(exit_timeout=0.5)
        gate = threading.Event()
        fut = anyfork.fork(gate.wait, 10)
        fut.add_done_callback(lambda f: threading.Event().wait())
        gate.set()
        """,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert "the done callbacks of 1 fork(s) did not finish within the exit bound" in result.stderr
