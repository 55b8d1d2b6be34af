"""Sync forks made on an event loop run on anyfork's one worker pool: what users rely on
inside them (anyio.from_thread, forks landing on the loop and in the scope) and around them
(scopes join and cancel them, they outlive their loop, no task per fork)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import anyio.from_thread
import pytest

import anyfork

from .conftest import BACKENDS, run_in_thread

pytestmark = pytest.mark.anyio


def _loop_thread_name() -> str:
    return threading.current_thread().name


async def _double(x: int) -> int:
    await anyio.sleep(0)
    return 2 * x


async def test_anyio_from_thread_works_inside_a_sync_fork_without_a_token() -> None:
    loop_thread = threading.current_thread().name

    def work(x: int) -> tuple[str, int, str]:
        ran_on = anyio.from_thread.run_sync(_loop_thread_name)
        doubled = anyio.from_thread.run(_double, x)
        return ran_on, doubled, threading.current_thread().name

    with anyio.fail_after(30):
        results = [await anyfork.fork(work, i) for i in range(5)]
    for i, (ran_on, doubled, worker) in enumerate(results):
        assert ran_on == loop_thread
        assert doubled == 2 * i
        assert worker != loop_thread


async def test_a_pool_thread_forgets_the_loop_once_the_fork_is_done() -> None:
    # The pool's threads serve every loop and scripts alike: a job run for a loop must not
    # leave that loop's token behind for the next job, made where no loop runs.
    with anyio.fail_after(30):
        await anyfork.fork(anyio.from_thread.run_sync, _loop_thread_name)

    def from_a_plain_thread() -> Any:
        futures = [anyfork.fork(anyio.from_thread.run_sync, _loop_thread_name) for _ in range(8)]
        return [type(future.exception_or_none()).__name__ for future in _settled(futures)]

    names = await anyio.to_thread.run_sync(run_in_thread, from_a_plain_thread)
    assert set(names) == {"NoEventLoopError"}


class _Outcome:
    def __init__(self, future: anyfork.Future[Any]) -> None:
        self.future = future

    def exception_or_none(self) -> BaseException | None:
        try:
            self.future.value()
        except BaseException as exc:
            return exc
        return None


def _settled(futures: list[anyfork.Future[Any]]) -> list[_Outcome]:
    for future in futures:
        try:
            future.wait(timeout=30)
        except Exception:
            pass
    return [_Outcome(future) for future in futures]


async def test_forks_made_inside_a_sync_fork_join_its_scope() -> None:
    release = threading.Event()
    inner: list[anyfork.Future[int]] = []

    async def slow_inner() -> int:
        await anyio.to_thread.run_sync(release.wait, 30)
        return 7

    def outer() -> None:
        inner.append(anyfork.fork(slow_inner))  # a coroutine fork, on the scope's loop
        inner.append(anyfork.fork(release.wait, 30))  # a sync fork, in the same scope

    with anyio.fail_after(30):
        async with anyfork.scope():
            await anyfork.fork(outer)
            assert not inner[0].done()
            release.set()
        # The scope joined the forks its sync fork made.
        assert inner[0].value() == 7
        assert inner[1].value() is True


async def test_a_scope_cancels_its_queued_sync_forks_and_joins_the_running_one() -> None:
    anyfork.configure(worker_threads=1)
    started = threading.Event()
    release = threading.Event()

    def running() -> str:
        started.set()
        release.wait(30)
        return "finished"

    with anyio.fail_after(30):
        async with anyfork.scope(cancel_pending=True) as scope:
            first = anyfork.fork(running)
            await anyio.to_thread.run_sync(started.wait, 30)
            queued = [anyfork.fork(abs, -i) for i in range(5)]  # behind it: one thread
            scope.cancel()
            release.set()
    assert first.value() == "finished"
    assert all(future.cancelled() for future in queued)


async def test_cancelling_a_scopes_task_still_waits_for_its_running_sync_fork() -> None:
    # A running sync fork cannot be stopped: the scope ends after it, as a task ends after
    # its anyio.to_thread.run_sync. The fork outlasts the cancellation by a bounded wait
    # that nothing cuts short; a scope that did not wait would end first.
    started = threading.Event()
    body_cancelled = threading.Event()
    events: list[str] = []

    def running() -> None:
        started.set()
        body_cancelled.wait(30)
        threading.Event().wait(0.3)
        events.append("fork ended")

    async def body() -> None:
        try:
            async with anyfork.scope():
                anyfork.fork(running)
                try:
                    await anyio.sleep_forever()
                finally:
                    body_cancelled.set()
        finally:
            events.append("scope ended")

    with anyio.fail_after(30):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(body)
            await anyio.to_thread.run_sync(started.wait, 30)
            task_group.cancel_scope.cancel()
    assert events == ["fork ended", "scope ended"]


async def test_awaiting_sync_forks_runs_them_side_by_side() -> None:
    # Each waits for the other: only parallel workers get through the barrier.
    barrier = threading.Barrier(3, timeout=20)
    with anyio.fail_after(30):
        futures = [anyfork.fork(barrier.wait) for _ in range(3)]
        indices = sorted([await future for future in futures])
    assert indices == [0, 1, 2]


async def test_a_sync_fork_takes_no_task_on_the_loop() -> None:
    if not isinstance(asyncio._get_running_loop(), asyncio.AbstractEventLoop):
        pytest.skip("counts asyncio tasks")
    release = threading.Event()
    anyfork.fork(abs, 0)  # the first fork may set up the loop's ambient task group
    await anyio.sleep(0)
    before = len(asyncio.all_tasks())
    futures = [anyfork.fork(release.wait, 30) for _ in range(50)]
    await anyio.sleep(0)
    during = len(asyncio.all_tasks())
    release.set()
    with anyio.fail_after(30):
        for future in futures:
            await future
    assert during == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_forks_outlive_the_loop_they_were_made_on(
    backend: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # They run on the process's worker pool, not on the loop: when the loop ends, queued
    # and running sync forks still finish, and nobody is told they were lost.
    release = threading.Event()

    async def main() -> list[anyfork.Future[int]]:
        anyfork.configure(worker_threads=1)
        return [anyfork.fork(lambda i=i: release.wait(30) and i) for i in range(4)]

    name, options = backend
    futures = anyio.run(main, backend=name, backend_options=options)
    release.set()
    assert [future.wait(timeout=30) for future in futures] == [0, 1, 2, 3]
    assert not [record for record in caplog.records if record.levelname != "DEBUG"]
