"""What anyfork keeps alive: failed futures are freed without a garbage collection pass,
and nothing is kept per event loop once the loop is gone."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import anyio
import pytest

from anyfork import fork

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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
