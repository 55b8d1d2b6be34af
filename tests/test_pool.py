"""Managed blocking: a worker thread blocked in a wait gives its slot back, so no nesting of
fork and wait deadlocks at any ``worker_threads``, on a loop or in a script."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import anyfork

from .conftest import run_in_thread, run_script

pytestmark = pytest.mark.anyio


def leaf(x: int) -> int:
    return x + 1


async def middle(x: int) -> int:
    return await anyfork.fork(leaf, x)


def outer(x: int) -> int:
    # sync fork -> blocks on a coroutine fork -> which awaits a sync fork
    return anyfork.wait(anyfork.fork(middle, x))


@pytest.mark.parametrize("worker_threads", [1, 2, 40])
async def test_sync_fork_waiting_on_a_coroutine_that_awaits_a_sync_fork_never_deadlocks(
    worker_threads: int,
) -> None:
    anyfork.configure(worker_threads=worker_threads)
    count = worker_threads + 5  # more blocked outer forks than there are slots
    with anyio.fail_after(30):
        futures = [anyfork.fork(outer, i) for i in range(count)]
        results = [await future for future in futures]
    assert results == [i + 1 for i in range(count)]


@pytest.mark.parametrize("worker_threads", [1, 3])
async def test_forks_blocked_in_a_timed_wait_still_let_the_inner_work_run(
    worker_threads: int,
) -> None:
    # A timed wait never runs the work inline, so only a freed slot lets it run.
    anyfork.configure(worker_threads=worker_threads)

    def outer_timed(x: int) -> int:
        return anyfork.wait(anyfork.fork(leaf, x), timeout=20)

    with anyio.fail_after(30):
        futures = [anyfork.fork(outer_timed, i) for i in range(worker_threads + 3)]
        results = [await future for future in futures]
    assert results == [i + 1 for i in range(worker_threads + 3)]


async def test_sync_forks_that_never_wait_stay_within_worker_threads() -> None:
    anyfork.configure(worker_threads=2)
    lock = threading.Lock()
    running = 0
    most = 0

    def busy() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    with anyio.fail_after(30):
        for future in [anyfork.fork(busy) for _ in range(8)]:
            await future
    assert most == 2


async def test_a_fork_resuming_after_a_wait_never_waits_for_a_place() -> None:
    # One place. A gives it back while it waits for the gate; B takes it and waits for an
    # event that A sets right after its own wait. Had A to take a place back before going
    # on, neither could finish.
    anyfork.configure(worker_threads=1)
    gate: anyfork.Future[None] = anyfork.Future()
    a_went_on = threading.Event()

    def a() -> None:
        anyfork.wait(gate)
        a_went_on.set()

    def b() -> bool:
        gate.set_result(None)
        return a_went_on.wait(20)

    with anyio.fail_after(30):
        first = anyfork.fork(a)
        await anyio.sleep(0.1)  # A is waiting on the gate
        assert await anyfork.fork(b) is True
        await first


async def test_a_timed_wait_in_a_worker_thread_holds_its_timeout() -> None:
    # Giving its place back lets a long fork start; resuming must not wait for that fork.
    anyfork.configure(worker_threads=1)

    def waits_briefly() -> float:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            anyfork.wait(anyfork.Future(), timeout=0.1)
        return time.monotonic() - began

    with anyio.fail_after(30):
        waited = anyfork.fork(waits_briefly)
        await anyio.sleep(0.02)
        long = anyfork.fork(time.sleep, 2)
        assert await waited < 1.5
        await long


def test_in_a_script_nested_waits_never_deadlock_with_one_worker_thread() -> None:
    result = run_script(
        """
        import anyfork
        anyfork.configure(worker_threads=1)

        def leaf(x):
            return x + 1

        async def middle(x):
            return await anyfork.fork(leaf, x)

        def outer(x):
            a = anyfork.wait(anyfork.fork(middle, x))
            b = anyfork.wait(anyfork.fork(leaf, x), timeout=20)
            return a + b

        futures = [anyfork.fork(outer, i) for i in range(6)]
        print(anyfork.wait_all(futures, timeout=30))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([2 * (i + 1) for i in range(6)])
    assert result.stderr == ""


def test_a_worker_blocked_in_a_wait_from_a_plain_thread_is_not_affected() -> None:
    # A thread that is not a worker holds no slot: waiting there changes nothing.
    future = anyfork.fork(leaf, 1)
    assert run_in_thread(lambda: anyfork.wait(future, timeout=10)) == 2


@pytest.mark.parametrize("repeat", range(2))
def test_a_job_queued_behind_busy_workers_does_not_count_as_an_idle_thread(repeat: int) -> None:
    # With one worker: a runs; b is queued, then taken by the worker as soon as a ends; b
    # blocks on a plain future (nothing to run inline); c, forked afterwards, must start a
    # thread of its own. Before, the pool counted the worker as idle once for a and never
    # took it back when the worker picked b from the queue, so c waited for a phantom.
    result = run_script(
        """
        import time, anyfork
        anyfork.configure(worker_threads=1)
        gate = anyfork.Future()

        a = anyfork.fork(time.sleep, 0.3)
        b = anyfork.fork(gate.wait)
        time.sleep(0.6)  # a is done, and b is blocked in its wait
        c = anyfork.fork(gate.set_result, "opened")
        print(anyfork.wait(b, timeout=10))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "opened\n"


def test_after_a_large_batch_blocked_workers_still_get_help() -> None:
    result = run_script(
        """
        import anyfork
        anyfork.wait_all([anyfork.fork(abs, -i) for i in range(200)])  # default: 40 workers
        gate = anyfork.Future()
        blocked = [anyfork.fork(gate.wait) for _ in range(40)]
        opener = anyfork.fork(gate.set_result, "open")
        print(set(anyfork.wait_all(blocked, timeout=10)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "{'open'}\n"


@pytest.mark.parametrize("repeat", range(20))
def test_a_job_queued_as_a_worker_takes_another_still_gets_a_thread(repeat: int) -> None:
    # A worker that has just taken a job is not idle any more: counting it as idle until it
    # said so left the next job queued with every thread busy (seen on 3.13: the third
    # party of a barrier never started). Idle workers from earlier work make the window.
    async def warm_up() -> None:
        for i in range(3):
            await anyfork.fork(abs, -i)

    async def meet() -> list[int]:
        barrier = threading.Barrier(3, timeout=10)
        futures = [anyfork.fork(barrier.wait) for _ in range(3)]
        return sorted([await future for future in futures])

    def script() -> list[int]:
        anyio.run(warm_up)
        return anyio.run(meet)

    assert run_in_thread(script) == [0, 1, 2]


def test_idle_worker_threads_retire_after_worker_idle_timeout() -> None:
    # Four forks that meet at a barrier need four threads at once; once idle for the
    # timeout, the threads exit, and a later fork starts one again.
    result = run_script(
        """
        import threading, time, anyfork
        anyfork.configure(worker_idle_timeout=0.2)

        def workers():
            return sum(t.name.startswith("anyfork-worker") for t in threading.enumerate())

        barrier = threading.Barrier(4, timeout=10)
        anyfork.wait_all([anyfork.fork(barrier.wait) for _ in range(4)], timeout=10)
        print(workers() >= 4)
        deadline = time.monotonic() + 10
        while workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(workers())
        print(anyfork.fork(abs, -7).wait(timeout=10))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True\n0\n7\n"
    assert result.stderr == ""


def test_idle_worker_threads_stay_without_an_idle_timeout() -> None:
    result = run_script(
        """
        import threading, time, anyfork
        anyfork.configure(worker_idle_timeout=None)
        barrier = threading.Barrier(4, timeout=10)
        anyfork.wait_all([anyfork.fork(barrier.wait) for _ in range(4)], timeout=10)
        time.sleep(0.5)
        print(sum(t.name.startswith("anyfork-worker") for t in threading.enumerate()) >= 4)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True\n"


@pytest.mark.parametrize("repeat", range(5))
def test_threads_retiring_as_jobs_arrive_never_strand_a_job(repeat: int) -> None:
    # With a timeout of a millisecond, idle threads retire all the time, right as jobs
    # are promised to idle threads; every job from four submitting threads must still run.
    result = run_script(
        """
        import threading, time, anyfork
        anyfork.configure(worker_idle_timeout=0.001, worker_threads=4)

        def submit(offset):
            total = 0
            for i in range(300):
                total += anyfork.fork(abs, -i).wait(timeout=10)
                if i % 50 == 0:
                    time.sleep(0.003)  # let the idle threads time out
            return total

        futures = [anyfork.fork(submit, k) for k in range(4)]
        print(anyfork.wait_all(futures, timeout=60))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{[sum(range(300))] * 4}\n"


@pytest.mark.parametrize("idle_timeout", ["float('inf')", "10**12", "1e10"])
def test_an_idle_timeout_too_long_for_a_thread_wait_keeps_idle_threads(idle_timeout: str) -> None:
    # A timeout longer than a thread can wait means "never retire" (as wait timeouts that
    # long mean "no bound"): the idle workers stay, and later forks run on them.
    result = run_script(
        f"""
        import threading, anyfork
        anyfork.configure(worker_idle_timeout={idle_timeout}, exit_timeout=2)
        barrier = threading.Barrier(3, timeout=10)
        anyfork.wait_all([anyfork.fork(barrier.wait) for _ in range(3)], timeout=10)
        print([anyfork.fork(abs, -i).wait(timeout=10) for i in range(5)])
        print(sum(t.name.startswith("anyfork-worker") for t in threading.enumerate()) >= 3)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[0, 1, 2, 3, 4]\nTrue\n"
    assert result.stderr == ""


def test_raising_worker_threads_starts_threads_for_forks_already_queued() -> None:
    result = run_script(
        """
        import threading, anyfork
        anyfork.configure(worker_threads=1, exit_timeout=2)
        release = threading.Event()
        busy = anyfork.fork(release.wait, 30)  # holds the one thread
        queued = anyfork.fork(abs, -7)  # queued behind it
        anyfork.configure(worker_threads=2)
        print(queued.wait(timeout=10))  # runs while the first fork still holds its thread
        release.set()
        print(busy.wait(timeout=10))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "7\nTrue\n"
    assert result.stderr == ""


def test_lowering_worker_threads_retires_idle_threads_at_once() -> None:
    result = run_script(
        """
        import threading, time, anyfork
        anyfork.configure(worker_threads=4, worker_idle_timeout=None)

        def workers():
            return sum(t.name.startswith("anyfork-worker") for t in threading.enumerate())

        barrier = threading.Barrier(4, timeout=10)
        anyfork.wait_all([anyfork.fork(barrier.wait) for _ in range(4)], timeout=10)
        anyfork.configure(worker_threads=1)  # no fork after this
        deadline = time.monotonic() + 10
        while workers() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        print(workers())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"
    assert result.stderr == ""


def test_anyforks_own_hand_offs_never_wait_behind_busy_worker_threads() -> None:
    # then(), as_completed() and collect_all() over background-loop forks are completed
    # by hand-offs to the worker pool: those run at once, even with every worker thread
    # held by a long sync fork and more sync forks queued behind it.
    result = run_script(
        """
        import threading, anyio, anyfork
        anyfork.configure(worker_threads=1, exit_timeout=2)

        async def coro():
            await anyio.sleep(0.05)
            return 5

        print(anyfork.fork(coro).wait(timeout=10))
        release = threading.Event()
        busy = anyfork.fork(release.wait, 60)
        queued = [anyfork.fork(release.wait, 60) for _ in range(3)]
        print(anyfork.fork(coro).then(lambda f: f.value() + 1).wait(timeout=10))
        print([f.value() for f in anyfork.as_completed([anyfork.fork(coro)], timeout=10)])
        print([f.value() for f in anyfork.collect_all([anyfork.fork(coro)]).wait(timeout=10)])
        release.set()
        print(anyfork.wait_all([busy, *queued], timeout=10))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "5\n6\n[5]\n[5]\n[True, True, True, True]\n"
    assert result.stderr == ""


@pytest.mark.parametrize("worker_threads", [1, 2])
async def test_sync_forks_blocked_in_from_thread_run_give_their_place_back(
    worker_threads: int,
) -> None:
    # Each sync fork calls back into its loop, whose helper awaits a sync fork: with every
    # slot held by a fork blocked in anyio.from_thread.run, that one needs a freed slot.
    anyfork.configure(worker_threads=worker_threads)

    async def helper(x: int) -> int:
        return await anyfork.fork(leaf, x)

    def outer(x: int) -> int:
        return anyio.from_thread.run(helper, x) + anyio.from_thread.run_sync(leaf, 0)

    count = worker_threads + 2
    with anyio.fail_after(20):
        futures = [anyfork.fork(outer, i) for i in range(count)]
        results = [await future for future in futures]
    assert results == [i + 2 for i in range(count)]


def test_a_script_that_ran_a_coroutine_fork_keeps_only_a_few_idle_worker_threads() -> None:
    # The pool keeps threads for the exit join (Python 3.12+ starts none then), but a
    # burst of sync forks does not leave all of its threads behind.
    result = run_script(
        """
        import threading, time, anyfork
        anyfork.configure(worker_idle_timeout=0.2)

        async def coro():
            return 1

        def workers():
            return sum(t.name.startswith("anyfork-worker") for t in threading.enumerate())

        print(anyfork.fork(coro).wait(timeout=10))  # the background loop
        barrier = threading.Barrier(12, timeout=10)
        anyfork.wait_all([anyfork.fork(barrier.wait) for _ in range(12)], timeout=10)
        print(workers() >= 12)
        deadline = time.monotonic() + 10
        while workers() > 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        print(1 <= workers() <= 4)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\nTrue\nTrue\n"
    assert result.stderr == ""
