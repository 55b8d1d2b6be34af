"""What anyfork keeps alive: failed futures are freed without a garbage collection pass,
and nothing is kept per event loop once the loop is gone."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import anyfork
from anyfork import fork

from .conftest import garbage_collector_disabled

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def no_gc() -> Iterator[None]:
    with garbage_collector_disabled():
        yield


async def fails() -> None:
    raise ValueError("nobody waits for this")


async def test_a_failed_coroutine_fork_nobody_waited_for_is_freed_without_gc(
    no_gc: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Its "never retrieved" report is made when the future is freed. (The captured log
    # record then keeps the future alive, so a weak reference would prove nothing.)
    fork(fails)
    never_retrieved = "exception of <anyfork.Future 'fails' failed> was never retrieved"
    for _ in range(200):
        if never_retrieved in caplog.text:
            break
        await anyio.sleep(0.005)
    assert never_retrieved in caplog.text, "the failed future is kept alive by a reference cycle"


def sync_work() -> int:
    return 1


async def coroutine_work() -> int:
    await anyio.sleep(0)
    return 2


def sync_work_that_forks() -> int:
    return fork(coroutine_work).wait() + fork(sync_work).wait()


async def forks_everywhere() -> None:
    """Fork sync and coroutine work, in the ambient group and in a scope."""
    assert await fork(sync_work) + await fork(coroutine_work) == 3
    assert await fork(sync_work_that_forks) == 3
    unwaited = [fork(sync_work), fork(coroutine_work)]
    async with anyfork.scope():
        assert await fork(sync_work) + await fork(coroutine_work) == 3
        fork(sync_work)
        fork(coroutine_work)
        fork(sync_work_that_forks)
    # The ambient forks nobody waited for finish before the run returns: a loop closed
    # without cancelling its tasks would lose them.
    for future in unwaited:
        await future


RUNS = 5


def freed(refs: list[weakref.ref[Any]], within: float = 10.0) -> list[bool]:
    """Whether each referent is freed, waiting up to ``within`` seconds for all of them.

    The thread that completes the last fork wakes the loop through the loop's handle (an
    asyncio loop, a trio token), and holds that handle until its wake-up call returns: the
    loop may finish its run meanwhile. With the GIL that thread nearly always lets go first;
    without it (free-threaded Python), a moment later. Something that keeps a loop is a leak
    all the same: it is still there when the wait is over.
    """
    deadline = time.monotonic() + within
    gc.collect()
    while any(ref() is not None for ref in refs) and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
    return [ref() is None for ref in refs]


@pytest.mark.parametrize("runner", ["asyncio.run", "uvloop.run", "run_until_complete"])
def test_no_asyncio_loop_is_kept_after_runs_that_forked(runner: str) -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await forks_everywhere()

    for _ in range(RUNS):
        if runner == "asyncio.run":
            asyncio.run(main(), debug=True)
        elif runner == "uvloop.run":
            uvloop = pytest.importorskip("uvloop")
            uvloop.run(main())
        else:  # a loop run by hand, closed without cancelling its remaining tasks
            loop = asyncio.new_event_loop()
            loop.run_until_complete(main())
            loop.close()
            del loop
    assert freed(loops) == [True] * RUNS


def test_no_trio_run_is_kept_after_runs_that_forked() -> None:
    trio = pytest.importorskip("trio")
    tokens: list[weakref.ref[object]] = []

    async def main() -> None:
        tokens.append(weakref.ref(trio.lowlevel.current_trio_token()))
        await forks_everywhere()

    for _ in range(RUNS):
        trio.run(main)
    assert freed(tokens) == [True] * RUNS


async def test_a_running_loop_keeps_its_ambient_group_through_garbage_collection() -> None:
    from anyfork import _loops
    from anyfork._ambient import ambient_group

    assert await fork(coroutine_work) == 2
    group = weakref.ref(ambient_group(_loops.running_native_loop()))
    gc.collect()
    assert group() is ambient_group(_loops.running_native_loop())
    assert await fork(coroutine_work) + await fork(sync_work) == 3
