"""Each fork is isolated: a cancellation that came from neither its future, its scope nor
its event loop's shutdown ends that fork alone."""

from __future__ import annotations

import asyncio
import logging

import anyio
import pytest

import anyfork
from anyfork import fork

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def awaits_a_task_somebody_else_cancelled() -> None:
    """Raise the loop's cancellation exception without this task being cancelled."""
    if not _on_asyncio():
        import trio

        # Trio's cancellations only come from cancel scopes; one caught elsewhere and
        # re-raised here is the nearest equivalent.
        raise trio.Cancelled._create()  # type: ignore[attr-defined]
    victim = asyncio.get_running_loop().create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    victim.cancel()
    await victim


async def sibling() -> str:
    await anyio.sleep(0.05)
    return "sibling finished"


def _stray_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "anyfork" and record.levelno >= logging.WARNING
    ]


async def test_a_stray_cancellation_ends_only_its_own_fork_in_the_ambient_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    siblings = [fork(sibling) for _ in range(3)]
    stray = fork(awaits_a_task_somebody_else_cancelled)
    assert [await each for each in siblings] == ["sibling finished"] * 3
    assert stray.cancelled()
    messages = _stray_warnings(caplog)
    assert len(messages) == 1, messages
    assert "'awaits_a_task_somebody_else_cancelled'" in messages[0]
    assert "event loop shut down" not in messages[0]
    # The ambient group still takes forks.
    assert await fork(sibling) == "sibling finished"


async def test_a_waiter_gets_anyforks_cancelled_error_caused_by_the_stray_cancellation() -> None:
    stray = fork(awaits_a_task_somebody_else_cancelled)
    with pytest.raises(anyfork.CancelledError) as raised:
        await stray
    assert isinstance(raised.value.__cause__, anyio.get_cancelled_exc_class())
    # The waiting task was not cancelled: it goes on awaiting.
    await anyio.sleep(0)
    with pytest.raises(anyfork.CancelledError) as raised_again:
        stray.value()
    assert raised_again.value.__cause__ is raised.value.__cause__


async def test_a_stray_cancellation_in_a_scope_cancels_neither_siblings_nor_the_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body_finished = False
    async with anyfork.scope():
        siblings = [fork(sibling) for _ in range(3)]
        stray = fork(awaits_a_task_somebody_else_cancelled)
        await anyio.sleep(0.1)
        body_finished = True
    assert body_finished
    assert [each.value() for each in siblings] == ["sibling finished"] * 3
    assert stray.cancelled()
    assert len(_stray_warnings(caplog)) == 1


async def test_cancelling_the_fork_itself_is_still_a_real_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with anyfork.scope():
        forever = fork(anyio.sleep_forever)
        other = fork(sibling)
        await anyio.sleep(0.01)
        assert forever.cancel()
    assert other.value() == "sibling finished"
    assert _stray_warnings(caplog) == []


async def test_cancelling_the_scope_still_cancels_its_forks() -> None:
    with anyio.move_on_after(0.05):
        async with anyfork.scope():
            forever = fork(anyio.sleep_forever)
            await anyio.sleep_forever()
    assert forever.cancelled()
