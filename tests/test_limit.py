"""anyfork.Limit: at most n forks under it run at once, process-wide, first come first served."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import anyio
import pytest

import anyfork
from anyfork import Limit, fork, options

from .conftest import run_script

pytestmark = pytest.mark.timeout(60)


class Counter:
    """Counts the forks running now, and the most that ever ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.total = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.total += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def test_forks_from_several_threads_and_two_loops_never_exceed_the_limit() -> None:
    limit = Limit(3)
    counter = Counter()

    @options(limit=limit)
    def work_sync() -> None:
        counter.enter()
        time.sleep(0.002)
        counter.leave()

    @options(limit=limit)
    async def work_async() -> None:
        counter.enter()
        await anyio.sleep(0.002)
        counter.leave()

    def from_a_thread() -> None:
        anyfork.wait_all([fork(work_sync) for _ in range(30)], timeout=60)

    async def on_a_loop() -> None:
        futures = [fork(work_async) for _ in range(30)] + [fork(work_sync) for _ in range(10)]
        await anyfork.collect_all(futures)
        for future in futures:
            future.value()

    threads = [threading.Thread(target=from_a_thread) for _ in range(3)]
    threads += [
        threading.Thread(target=anyio.run, args=(on_a_loop,), kwargs={"backend": backend})
        for backend in ("asyncio", "trio")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert counter.total == 3 * 30 + 2 * 40
    assert counter.most <= 3
    assert (limit.running, limit.waiting) == (0, 0)


@pytest.mark.anyio
async def test_coroutine_forks_under_a_limit_never_exceed_it_on_every_backend() -> None:
    counter = Counter()

    @options(limit=2)
    async def work() -> None:
        counter.enter()
        await anyio.sleep(0.005)
        counter.leave()

    async with anyfork.scope():
        for _ in range(20):
            fork(work)
    assert (counter.total, counter.most) == (20, 2)


def blocker(limit: Limit) -> tuple[anyfork.Future[None], threading.Event, threading.Event]:
    """A sync fork that holds a place in ``limit`` until released."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    future = fork(options(hold, limit=limit))
    assert started.wait(10)
    return future, started, release


def test_forks_waiting_for_a_place_start_first_come_first_served() -> None:
    limit = Limit(1)
    held, _, release = blocker(limit)
    order: list[int] = []
    record = options(order.append, limit=limit)
    futures = [fork(record, i) for i in range(50)]
    assert limit.waiting == 50
    release.set()
    anyfork.wait_all([held, *futures], timeout=30)
    assert order == list(range(50))


def test_raising_total_at_run_time_lets_waiting_forks_start() -> None:
    limit = Limit(1)
    held, _, release = blocker(limit)
    started = [threading.Event() for _ in range(2)]
    waiting = [fork(options(event.set, limit=limit)) for event in started]
    assert not any(event.wait(0.05) for event in started)
    limit.total = 3
    assert all(event.wait(10) for event in started)  # while the blocker still holds its place
    anyfork.wait_all(waiting, timeout=10)
    release.set()
    held.wait(10)
    assert (limit.total, limit.running, limit.waiting) == (3, 0, 0)


def test_lowering_total_lets_running_forks_finish_and_starts_no_new_one_until_below_it() -> None:
    limit = Limit(2)
    first, _, release_first = blocker(limit)
    second, _, release_second = blocker(limit)
    limit.total = 1
    started = threading.Event()
    later = fork(options(started.set, limit=limit))
    release_first.set()
    first.wait(10)
    assert not started.wait(0.05)  # one still runs: the new total is reached
    release_second.set()
    second.wait(10)
    later.wait(10)
    assert started.is_set()


def test_a_sync_fork_that_waits_for_a_fork_of_its_own_limit_of_one_does_not_deadlock() -> None:
    limit = Limit(1)

    @options(limit=limit)
    def depth(n: int) -> int:
        return 0 if n == 0 else fork(depth, n - 1).wait() + 1

    assert fork(depth, 8).wait(timeout=30) == 8
    assert (limit.running, limit.waiting) == (0, 0)


@pytest.mark.anyio
async def test_a_coroutine_fork_that_awaits_a_fork_of_its_own_limit_does_not_deadlock() -> None:
    limit = Limit(1)
    counter = Counter()

    @options(limit=limit)
    async def depth(n: int) -> int:
        counter.enter()
        try:
            if n == 0:
                return 0
            inner = fork(depth, n - 1)
            counter.leave()  # it waits: its place goes to the inner fork
            try:
                return await inner + 1
            finally:
                counter.enter()
        finally:
            counter.leave()

    @options(limit=limit)
    def sync_depth(n: int) -> int:
        return 0 if n == 0 else anyfork.wait(fork(depth, n - 1)) + 1

    with anyio.fail_after(30):
        assert await fork(depth, 6) == 6
        assert await fork(sync_depth, 4) == 4  # a sync fork waiting for coroutine forks
    assert counter.most == 1
    assert (limit.running, limit.waiting) == (0, 0)


def test_ten_thousand_queued_forks_hold_no_extra_threads() -> None:
    limit = Limit(1)
    held, _, release = blocker(limit)
    threads_before = threading.active_count()
    done = Counter()
    futures = [fork(options(done.enter, limit=limit)) for _ in range(10_000)]
    assert threading.active_count() <= threads_before + 1  # the deadline thread at most
    assert limit.waiting == 10_000
    queued = [record for record in anyfork.pending() if record.state == "queued"]
    assert len(queued) >= 10_000
    release.set()
    anyfork.wait_all([held, *futures], timeout=60)
    assert done.total == 10_000


@pytest.mark.anyio
async def test_a_queued_coroutine_fork_shows_as_queued_in_pending() -> None:
    limit = Limit(1)
    started, release = anyio.Event(), anyio.Event()

    @options(limit=limit)
    async def hold() -> None:
        started.set()
        await release.wait()

    first, second = fork(hold), fork(hold)
    with anyio.fail_after(10):
        await started.wait()
    assert (limit.running, limit.waiting) == (1, 1)
    states = {record.future: record.state for record in anyfork.pending()}
    assert (states[first], states[second]) == ("running", "queued")
    release.set()
    await first
    await second


def test_cancelling_a_queued_fork_takes_it_out_of_the_line_and_it_never_runs() -> None:
    limit = Limit(1)
    held, _, release = blocker(limit)
    ran = threading.Event()
    queued = fork(options(ran.set, limit=limit))
    assert queued.cancel()
    assert limit.waiting == 0
    release.set()
    held.wait(10)
    fork(options(lambda: None, limit=limit)).wait(10)  # the line has moved past it
    assert not ran.is_set()
    assert limit.running == 0


def test_a_limit_shared_by_two_callables_bounds_them_together() -> None:
    limit = Limit(1)
    counter = Counter()

    def one() -> None:
        counter.enter()
        time.sleep(0.001)
        counter.leave()

    first, second = options(one, limit=limit), options(one, limit=limit)
    anyfork.wait_all([fork(f) for _ in range(20) for f in (first, second)], timeout=30)
    assert (counter.total, counter.most) == (40, 1)


@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_below_one_is_a_value_error_naming_total(bad: int) -> None:
    with pytest.raises(ValueError, match="total"):
        Limit(bad)
    limit = Limit(1)
    with pytest.raises(ValueError, match="total"):
        limit.total = bad
    assert limit.total == 1


@pytest.mark.parametrize("bad", [1.5, "2", True, None])
def test_a_limit_that_is_not_a_whole_number_is_a_type_error_naming_total(bad: Any) -> None:
    with pytest.raises(TypeError, match="total"):
        Limit(bad)


def test_a_limit_reports_total_running_and_waiting() -> None:
    limit = Limit(1)
    held, _, release = blocker(limit)
    queued = fork(options(lambda: None, limit=limit))
    assert (limit.total, limit.running, limit.waiting) == (1, 1, 1)
    assert repr(limit) == "<anyfork.Limit total=1 running=1 waiting=1>"
    release.set()
    anyfork.wait_all([held, queued], timeout=10)
    assert (limit.running, limit.waiting) == (0, 0)


def test_cancelling_a_fork_whose_job_waits_for_a_worker_thread_gives_its_place_back() -> None:
    anyfork.configure(worker_threads=1)
    started, release = threading.Event(), threading.Event()

    def occupy() -> None:
        started.set()
        release.wait(30)

    busy = fork(occupy)  # the only worker thread
    assert started.wait(10)
    limit = Limit(1)
    ran = threading.Event()
    queued_in_pool = fork(options(ran.set, limit=limit))
    assert limit.running == 1  # it has its place, and waits for a thread
    assert queued_in_pool.cancel()
    assert limit.running == 0
    release.set()
    busy.wait(10)
    assert not ran.is_set()


@pytest.mark.anyio
async def test_sync_forks_under_a_limit_awaited_on_every_backend_never_exceed_it() -> None:
    counter = Counter()

    @options(limit=2)
    def work() -> None:
        counter.enter()
        time.sleep(0.002)
        counter.leave()

    with anyio.fail_after(30):
        for future in [fork(work) for _ in range(12)]:
            await future
    assert (counter.total, counter.most) == (12, 2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_child_made_by_os_fork_starts_with_every_limit_empty() -> None:
    result = run_script(
        """
        import os, threading, anyfork

        limit = anyfork.Limit(1)
        started, release = threading.Event(), threading.Event()

        def hold():
            started.set()
            release.wait(30)

        held = anyfork.fork(anyfork.options(hold, limit=limit))
        started.wait(10)
        queued = anyfork.fork(anyfork.options(lambda: None, limit=limit))
        pid = os.fork()
        if pid == 0:  # the child: the parent's holder and queued fork are not here
            value = anyfork.fork(anyfork.options(lambda: 42, limit=limit)).wait(timeout=10)
            os._exit(0 if value == 42 and limit.running == 0 else 1)
        _, status = os.waitpid(pid, 0)
        release.set()
        anyfork.wait_all([held, queued], timeout=10)
        print("child", os.waitstatus_to_exitcode(status), limit)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "child 0 <anyfork.Limit total=1 running=0 waiting=0>" in result.stdout
