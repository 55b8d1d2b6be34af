"""anyfork in asyncio-native test suites written with pytest-asyncio."""

from __future__ import annotations

import asyncio

import pytest

import anyfork


@pytest.mark.asyncio
async def test_fork_and_await_under_pytest_asyncio() -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert await anyfork.fork(double, 4) == 8
    assert await anyfork.fork(sum, [1, 2, 3]) == 6


@pytest.mark.asyncio
async def test_scope_under_pytest_asyncio() -> None:
    done: list[int] = []

    async def record(i: int) -> None:
        await asyncio.sleep(0.001)
        done.append(i)

    async with anyfork.scope():
        for i in range(5):
            anyfork.fork(record, i)
    assert sorted(done) == [0, 1, 2, 3, 4]


@pytest.mark.asyncio
async def test_a_fork_can_be_awaited_with_asyncio_wait_for() -> None:
    async def slow() -> str:
        await asyncio.sleep(0.01)
        return "ok"

    fut = anyfork.fork(slow)
    assert await asyncio.wait_for(anyfork.wait_async(fut), timeout=10) == "ok"
