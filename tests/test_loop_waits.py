"""Blocking waits on an event loop's thread behave like torch.jit.wait outside TorchScript:
a sync fork made since the loop last got control runs in the caller, so a forward that forks
and waits works when called directly in async code; awaiting its futures gives parallelism.
Anything else raises WouldBlockError, whatever the timing."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

import anyfork

pytestmark = pytest.mark.anyio


def branch(x: int, ran_in: list[tuple[int, int]]) -> int:
    ran_in.append((x, threading.get_ident()))
    return x * x


def forward(xs: list[int], ran_in: list[tuple[int, int]]) -> int:
    futures = [anyfork.fork(branch, x, ran_in) for x in xs]
    return sum(anyfork.wait(future) for future in futures)


def forward_with_wait_all(xs: list[int], ran_in: list[tuple[int, int]]) -> int:
    return sum(anyfork.wait_all([anyfork.fork(branch, x, ran_in) for x in xs]))


def forward_with_future_wait(xs: list[int], ran_in: list[tuple[int, int]]) -> int:
    return sum(anyfork.fork(branch, x, ran_in).wait() for x in xs)


@pytest.mark.parametrize("model", [forward, forward_with_wait_all, forward_with_future_wait])
async def test_a_forward_that_forks_and_waits_works_when_called_in_async_code(
    model: Callable[[list[int], list[tuple[int, int]]], int],
) -> None:
    ran_in: list[tuple[int, int]] = []
    assert model([1, 2, 3], ran_in) == 14
    # In the caller, on the loop's thread, each branch exactly once.
    assert sorted(x for x, _ in ran_in) == [1, 2, 3]
    assert {thread for _, thread in ran_in} == {threading.get_ident()}
    await anyio.sleep(0.05)  # the forks' tasks start, find their futures done, and end
    assert len(ran_in) == 3


async def test_nested_forks_and_waits_run_depth_first_in_the_caller() -> None:
    def leaf(x: int) -> int:
        return x + 1

    def inner(x: int) -> int:
        return anyfork.wait(anyfork.fork(leaf, x)) * 2

    def outer(x: int) -> int:
        return anyfork.wait(anyfork.fork(inner, x)) + anyfork.wait(anyfork.fork(inner, x + 1))

    assert outer(1) == 10


async def test_awaiting_the_same_forks_runs_them_in_worker_threads() -> None:
    ran_in: list[tuple[int, int]] = []
    futures = [anyfork.fork(branch, x, ran_in) for x in (1, 2, 3)]
    assert [await future for future in futures] == [1, 4, 9]
    assert threading.get_ident() not in {thread for _, thread in ran_in}


async def coroutine_branch() -> int:
    await anyio.sleep(0)
    return 1


async def test_blocking_on_work_that_needs_the_loop_still_raises_would_block() -> None:
    coroutine_fork = anyfork.fork(coroutine_branch)
    with pytest.raises(anyfork.WouldBlockError, match="await fut"):
        anyfork.wait(coroutine_fork)
    assert await coroutine_fork == 1


async def test_a_sync_fork_already_running_elsewhere_raises_would_block() -> None:
    started = threading.Event()
    release = threading.Event()

    def running() -> int:
        started.set()
        release.wait(10)
        return 7

    future = anyfork.fork(running)
    with anyio.fail_after(10):
        while not started.is_set():
            await anyio.sleep(0.01)
    with pytest.raises(anyfork.WouldBlockError, match="since the loop last got control"):
        anyfork.wait(future)
    release.set()
    assert await future == 7


async def test_a_timed_wait_on_the_loop_never_runs_the_fork_inline() -> None:
    ran_in: list[tuple[int, int]] = []
    future = anyfork.fork(branch, 3, ran_in)
    with pytest.raises(anyfork.WouldBlockError):
        anyfork.wait(future, timeout=5)
    assert await future == 9
    assert threading.get_ident() not in {thread for _, thread in ran_in}


def uses_the_loop() -> int:
    return anyio.from_thread.run_sync(lambda: 1)  # a sync fork's promise: it reaches the loop


async def test_a_wait_after_the_loop_got_control_raises_would_block_whatever_the_timing() -> None:
    # The fork was handed to the worker pool when the loop got control. Before, a blocking
    # wait then ran it in the caller if no worker had started it yet (here: the only worker
    # is busy), where anyio.from_thread fails, and raised WouldBlockError if one had: the
    # same code worked or failed by timing. Now it always raises WouldBlockError.
    anyfork.configure(worker_threads=1)
    release = threading.Event()
    busy = anyfork.fork(release.wait, 10)  # the only worker thread
    future = anyfork.fork(uses_the_loop)
    for _ in range(5):
        await anyio.sleep(0)  # the loop gets control: both forks go to the pool
    try:
        with pytest.raises(anyfork.WouldBlockError, match="use 'await fut'"):
            anyfork.wait(future)
    finally:
        release.set()
    assert await busy
    assert await future == 1


async def test_a_sync_fork_run_in_the_caller_on_the_loop_says_why_its_loop_calls_fail() -> None:
    # Forked and waited for in one stretch, it runs in the caller, on the loop's thread,
    # where anyio.from_thread (or asyncio.run) cannot work: deterministically, and the error
    # says what happened and what to do instead.
    future = anyfork.fork(uses_the_loop)
    with pytest.raises(RuntimeError) as caught:
        anyfork.wait(future)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "ran in the caller, on the event loop's thread" in notes
    assert "await" in notes
