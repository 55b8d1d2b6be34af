"""anyfork.scope(): structured joins, failure reporting, cancellation."""

from __future__ import annotations

import gc
import sys
import threading
import weakref

import anyio
import pytest

import anyfork
from anyfork import fork

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_scope_exit_waits_for_every_fork_including_unwaited_ones() -> None:
    finished: list[str] = []

    async def slow(name: str) -> None:
        await anyio.sleep(0.02)
        finished.append(name)

    def slow_sync(name: str) -> None:
        threading.Event().wait(0.02)
        finished.append(name)

    async with anyfork.scope():
        fork(slow, "task")
        fork(slow_sync, "thread")
    assert sorted(finished) == ["task", "thread"]


async def test_forks_made_by_forks_belong_to_the_scope() -> None:
    finished: list[str] = []

    async def grandchild(name: str) -> None:
        await anyio.sleep(0.02)
        finished.append(name)

    async def child_task() -> None:
        fork(grandchild, "from a task")

    def child_thread() -> None:
        fork(grandchild, "from a thread")
        fork(lambda: finished.append("sync from a thread"))

    async with anyfork.scope():
        fork(child_task)
        fork(child_thread)
    assert sorted(finished) == ["from a task", "from a thread", "sync from a thread"]


async def test_unretrieved_failures_are_raised_as_an_exception_group() -> None:
    async def fails(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ExceptionGroup) as raised:
        async with anyfork.scope():
            fork(fails, "a")
            fork(lambda: 1 / 0)
    assert sorted(type(e).__name__ for e in raised.value.exceptions) == [
        "ValueError",
        "ZeroDivisionError",
    ]


async def test_failures_the_body_retrieved_are_not_raised_again() -> None:
    async def fails() -> None:
        raise ValueError("seen")

    async with anyfork.scope():
        fut = fork(fails)
        with pytest.raises(ValueError):
            await fut


async def test_a_failing_fork_does_not_cancel_its_siblings_or_the_body() -> None:
    sibling_done = anyio.Event()

    async def fails() -> None:
        raise RuntimeError("fork failed")

    async def sibling() -> str:
        await anyio.sleep(0.05)
        sibling_done.set()
        return "ok"

    body_finished = False
    with pytest.raises(ExceptionGroup):
        async with anyfork.scope():
            fork(fails)
            ok = fork(sibling)
            await anyio.sleep(0.01)
            body_finished = True
    assert body_finished
    assert sibling_done.is_set()
    assert ok.value() == "ok"


async def test_cancelling_the_enclosing_task_cancels_the_scopes_forks() -> None:
    started = anyio.Event()
    forks: list[anyfork.Future[None]] = []

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.move_on_after(10) as outer:
        async with anyio.create_task_group() as tg:

            async def body() -> None:
                async with anyfork.scope():
                    forks.append(fork(forever))
                    await anyio.sleep_forever()

            tg.start_soon(body)
            await started.wait()
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught
    assert forks[0].cancelled()


async def test_cancel_pending_option_cancels_forks_at_exit_instead_of_joining() -> None:
    async def forever() -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with anyfork.scope(cancel_pending=True):
            fut = fork(forever)
            await anyio.sleep(0)
    assert fut.cancelled()


async def test_a_body_exception_propagates_unchanged_after_forks_finish() -> None:
    finished = anyio.Event()

    async def work() -> None:
        await anyio.sleep(0.01)
        finished.set()

    with pytest.raises(KeyError):
        async with anyfork.scope():
            fork(work)
            raise KeyError("body")
    assert finished.is_set()


async def test_scopes_nest_and_forks_go_to_the_innermost() -> None:
    inner_done = anyio.Event()

    async def inner_work() -> None:
        await anyio.sleep(0.02)
        inner_done.set()

    async with anyfork.scope():
        async with anyfork.scope():
            fork(inner_work)
        assert inner_done.is_set()


async def test_a_scope_can_be_entered_only_once() -> None:
    scope = anyfork.scope()
    async with scope:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        async with scope:
            pass


def test_cancel_pending_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="cancel_pending"):
        anyfork.scope(cancel_pending="yes")  # type: ignore[arg-type]


async def test_nested_scopes_cancelled_from_another_thread_cancel_every_level() -> None:
    """A cancel from outside reaches forks in every nested scope; a running sync fork is joined."""
    token = anyio.lowlevel.current_token()
    all_started = threading.Barrier(4)
    release_sync = threading.Event()
    forks: list[anyfork.Future[None]] = []

    async def forever() -> None:
        await anyio.to_thread.run_sync(all_started.wait, 5)
        await anyio.sleep_forever()

    def blocking() -> None:
        all_started.wait(5)
        release_sync.wait(10)

    def canceller(scope: anyio.CancelScope) -> None:
        all_started.wait(5)
        anyio.from_thread.run_sync(scope.cancel, token=token)
        release_sync.set()

    with anyio.fail_after(20):
        with anyio.CancelScope() as outer:
            async with anyfork.scope():
                forks.append(fork(forever))
                async with anyfork.scope():
                    forks.append(fork(forever))
                    forks.append(fork(blocking))
                    helper = threading.Thread(target=canceller, args=(outer,))
                    helper.start()
                    await anyio.sleep_forever()
        await anyio.to_thread.run_sync(helper.join, 5)  # a blocking join: not on the loop
    assert outer.cancelled_caught
    assert forks[0].cancelled() and forks[1].cancelled()
    # A sync fork already running cannot be interrupted: the scope waits for it to finish.
    assert forks[2].done() and not forks[2].cancelled()
    assert release_sync.is_set()


# --- a long-lived scope forgets the failures it no longer needs (issue 17, item 14) -------


class Frames:
    """A large object a failing fork's frame holds, followed with a weak reference."""


async def handled_failure(keep: list[weakref.ref[Frames]]) -> None:
    held = Frames()
    keep.append(weakref.ref(held))
    raise ValueError("handled")


async def test_a_scope_forgets_failures_once_they_were_retrieved() -> None:
    refs: list[weakref.ref[Frames]] = []
    async with anyfork.scope():
        for _ in range(300):
            with pytest.raises(ValueError, match="handled"):
                await anyfork.fork(handled_failure, refs)
        gc.collect()
        # Still inside the scope: at most a few dozen retrieved failures wait to be pruned.
        alive = sum(ref() is not None for ref in refs)
        assert alive <= 64, f"{alive} retrieved failures (and their frames) are still held"


async def test_a_scope_still_raises_the_failures_nobody_retrieved_among_many_handled() -> None:
    refs: list[weakref.ref[Frames]] = []
    with pytest.raises(BaseExceptionGroup) as caught:
        async with anyfork.scope():
            unread = [anyfork.fork(handled_failure, refs) for _ in range(3)]
            for _ in range(200):
                with pytest.raises(ValueError, match="handled"):
                    await anyfork.fork(handled_failure, refs)
            await anyfork.wait_async(anyfork.collect_all(unread))
            del unread
    assert len(caught.value.exceptions) == 3
