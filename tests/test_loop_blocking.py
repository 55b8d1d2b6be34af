"""The loop-blocking detector is on for every test: prove it, so its silence means something."""

from __future__ import annotations

import time

import pytest
from blockbuster import BlockingError

import anyfork

from .conftest import run_script

pytestmark = pytest.mark.anyio


async def test_the_detector_fails_a_blocking_call_on_an_asyncio_loop(
    anyio_backend_name: str,
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("blockbuster watches asyncio loops (uvloop included) only")
    with pytest.raises(BlockingError):
        time.sleep(0.001)


async def test_a_sync_fork_may_block_because_it_runs_off_the_loop() -> None:
    fut = anyfork.fork(time.sleep, 0.01)
    assert await fut is None


def test_anyfork_imports_what_its_forks_need_before_any_loop_runs() -> None:
    # Imported lazily, these would load on the loop at the first fork, blocking it for up
    # to a hundred milliseconds.
    result = run_script(
        """
        import sys
        import anyfork
        print(all(m in sys.modules for m in ("anyio._backends._asyncio", "anyio.to_thread")))
        """
    )
    assert result.stdout == "True\n", result.stderr
