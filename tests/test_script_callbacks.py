"""Done callbacks of coroutine forks made in a script: they never run on anyfork's
background loop, so they may block, wait and fork like any script code."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

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


def futures_reachable_from(obj: object, depth: int = 4) -> list[anyfork.Future[Any]]:
    """The futures ``obj`` holds, directly or through up to ``depth`` other objects."""
    found: list[anyfork.Future[Any]] = []
    frontier, seen = [obj], {id(obj)}
    for _ in range(depth):
        nxt = []
        for referent in (r for held in frontier for r in gc.get_referents(held)):
            if id(referent) in seen or isinstance(referent, type):
                continue
            seen.add(id(referent))
            if isinstance(referent, anyfork.Future):
                found.append(referent)
            nxt.append(referent)
        frontier = nxt
    return found


def test_the_job_that_ran_a_forks_callbacks_keeps_no_future_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker thread on its way back to the queue, or a waiter that ran the job, may still
    # hold it a while after it ran; it must not keep the fork's future (nor its own) alive
    # then: a burst of script forks left futures alive so, on free-threaded Python.
    from anyfork import _pool

    jobs: list[object] = []  # stands in for whoever still holds a job
    submit = _pool.submit

    def keep(job: Any) -> None:
        jobs.append(job)
        submit(job)

    monkeypatch.setattr(_pool, "submit", keep)
    called_back = threading.Event()

    def script() -> weakref.ref[anyfork.Future[int]]:
        fut = anyfork.fork(async_parent)
        fut.add_done_callback(lambda _: called_back.set())
        return weakref.ref(fut)

    fut = run_in_thread(script)
    assert called_back.wait(10)
    assert len(jobs) == 1
    deadline = time.monotonic() + 10  # the job settles its own future after the callback
    while (fut() is not None or futures_reachable_from(jobs[0])) and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
    assert fut() is None
    assert futures_reachable_from(jobs[0]) == []


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
