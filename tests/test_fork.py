"""fork() on a running event loop: where work runs, arguments, errors, context, cancel."""

from __future__ import annotations

import contextvars
import functools
import math
import threading
from typing import Any

import anyio
import pytest

import anyfork
from anyfork import fork

from .conftest import run_script

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def add(a: int, b: int = 0) -> int:
    await anyio.sleep(0)
    return a + b


def blocking_add(a: int, b: int = 0) -> int:
    return a + b


async def test_coroutine_fork_runs_as_a_task_on_the_loop_thread() -> None:
    loop_thread = threading.get_ident()

    async def where() -> int:
        return threading.get_ident()

    assert await fork(where) == loop_thread


async def test_sync_fork_runs_in_a_worker_thread_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    assert await fork(threading.get_ident) != loop_thread


async def test_fork_returns_before_the_work_runs() -> None:
    started = anyio.Event()

    async def work() -> str:
        started.set()
        return "done"

    fut = fork(work)
    assert not fut.done()
    assert not started.is_set()
    assert await fut == "done"


async def test_arguments_and_keywords_in_any_order() -> None:
    assert await fork(add, 1, 2) == 3
    assert await fork(add, b=2, a=1) == 3
    assert await fork(blocking_add, b=5, a=1) == 6


async def test_the_forked_function_may_take_a_keyword_named_func() -> None:
    def uses_func(func: str) -> str:
        return func.upper()

    assert await fork(uses_func, func="ok") == "OK"


@pytest.mark.parametrize(
    ("func", "args", "expected"),
    [
        (lambda x: x * 3, (2,), 6),
        (math.factorial, (5,), 120),
        (len, ("abc",), 3),
        ("-".join, (["a", "b"],), "a-b"),
        (functools.partial(blocking_add, 1), (1,), 2),
        (functools.partial(add, 10), (1,), 11),
    ],
    ids=["lambda", "builtin", "builtin len", "bound method", "partial", "async partial"],
)
async def test_any_callable_can_be_forked(func: Any, args: tuple[Any, ...], expected: Any) -> None:
    assert await fork(func, *args) == expected


async def test_a_callable_object_with_async_call_runs_as_a_task() -> None:
    class Model:
        async def __call__(self, x: int) -> tuple[int, int]:
            return x, threading.get_ident()

    assert await fork(Model(), 4) == (4, threading.get_ident())


async def test_non_callable_raises_type_error_at_fork() -> None:
    with pytest.raises(TypeError, match="takes a callable"):
        fork(42)  # type: ignore[call-overload]


async def test_a_coroutine_object_raises_type_error_naming_the_fix() -> None:
    coro = add(1, 2)
    with pytest.raises(TypeError, match=r"write fork\(add, \.\.\.\)"):
        fork(coro)  # type: ignore[call-overload]


async def test_errors_of_the_work_are_raised_at_wait_never_at_fork() -> None:
    async def fails() -> None:
        raise KeyError("async")

    def fails_sync() -> None:
        raise KeyError("sync")

    first, second = fork(fails), fork(fails_sync)
    with pytest.raises(KeyError, match="async"):
        await first
    with pytest.raises(KeyError, match="sync"):
        await second


async def test_results_keep_their_identity() -> None:
    payload = {"big": list(range(10))}

    async def give() -> dict[str, list[int]]:
        return payload

    assert await fork(give) is payload
    assert await fork(lambda: payload) is payload


async def test_contextvars_are_copied_into_forks_and_never_back() -> None:
    request_id.set("req-1")

    async def read_and_change() -> str:
        seen = request_id.get()
        request_id.set("changed in task")
        return seen

    def read_and_change_sync() -> str:
        seen = request_id.get()
        request_id.set("changed in thread")
        return seen

    assert await fork(read_and_change) == "req-1"
    assert await fork(read_and_change_sync) == "req-1"
    assert request_id.get() == "req-1"


async def test_forks_nobody_waits_for_still_run_to_completion() -> None:
    finished = anyio.Event()

    async def fire_and_forget() -> None:
        await anyio.sleep(0.01)
        finished.set()

    fork(fire_and_forget)
    with anyio.fail_after(10):
        await finished.wait()


async def test_nested_forks_to_depth_fifty() -> None:
    async def nest(depth: int) -> int:
        if depth == 0:
            return 0
        if depth % 2:
            return 1 + await fork(nest, depth - 1)
        return 1 + await fork(lambda: anyfork.wait(fork(nest, depth - 1)))

    assert await fork(nest, 50) == 50


async def test_a_sync_fork_can_fork_coroutines_onto_the_loop_and_wait() -> None:
    loop_thread = threading.get_ident()

    async def on_loop() -> int:
        return threading.get_ident()

    def in_worker() -> tuple[int, int]:
        return threading.get_ident(), anyfork.wait(fork(on_loop))

    worker_thread, task_thread = await fork(in_worker)
    assert task_thread == loop_thread
    assert worker_thread != loop_thread


async def test_fork_from_an_anyio_worker_thread_goes_to_that_loop() -> None:
    loop_thread = threading.get_ident()

    def in_worker() -> int:
        return anyfork.wait(fork(_loop_thread_ident))

    assert await anyio.to_thread.run_sync(in_worker) == loop_thread


async def _loop_thread_ident() -> int:
    return threading.get_ident()


@pytest.mark.parametrize("from_thread", [False, True], ids=["from the loop", "from a thread"])
async def test_cancel_stops_a_coroutine_fork(from_thread: bool) -> None:
    started, stopped = anyio.Event(), anyio.Event()

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    fut = fork(forever)
    await started.wait()
    if from_thread:
        assert await anyio.to_thread.run_sync(fut.cancel) is True
    else:
        assert fut.cancel() is True
    with anyio.fail_after(10):
        await stopped.wait()
    assert fut.cancelled()
    with pytest.raises(anyfork.CancelledError):
        await fut


async def test_a_sync_fork_cancelled_before_it_starts_never_starts() -> None:
    anyfork.configure(worker_threads=1)
    ran: list[str] = []
    gate = threading.Event()
    async with anyfork.scope():
        blocker = fork(gate.wait, 10)
        queued = fork(ran.append, "should not run")
        assert queued.cancel() is True
        gate.set()
    assert blocker.value() is True
    assert ran == []
    assert queued.cancelled()


async def test_cancel_of_a_running_sync_fork_returns_false_and_it_completes() -> None:
    running, release = threading.Event(), threading.Event()

    def work() -> str:
        running.set()
        release.wait(10)
        return "finished"

    fut = fork(work)
    await anyio.to_thread.run_sync(running.wait, 10)
    assert fut.cancel() is False
    release.set()
    assert await fut == "finished"


async def test_cancelling_a_waiter_does_not_cancel_the_fork() -> None:
    release = anyio.Event()

    async def slow() -> str:
        await release.wait()
        return "still here"

    fut = fork(slow)
    with anyio.move_on_after(0.01):
        await fut
    assert not fut.done()
    release.set()
    assert await fut == "still here"


async def test_sync_forks_do_not_use_anyios_default_thread_limiter() -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    seen: list[float] = []

    def record() -> None:
        seen.append(limiter.borrowed_tokens)

    await fork(record)
    assert seen == [0]


async def test_nested_fork_and_wait_never_starves_worker_threads() -> None:
    anyfork.configure(worker_threads=1)

    def tree(depth: int) -> int:
        if depth == 0:
            return 1
        children = [fork(tree, depth - 1) for _ in range(2)]
        return sum(anyfork.wait(child) for child in children)

    with anyio.fail_after(20):
        assert await fork(tree, 5) == 32


async def test_blocking_wait_on_the_loop_thread_raises_would_block() -> None:
    fut = fork(anyio.sleep, 0.01)
    with pytest.raises(anyfork.WouldBlockError, match="await"):
        anyfork.wait(fut)
    await fut
    assert anyfork.wait(fut) is None  # a done future just returns its value


async def test_a_function_marked_as_coroutine_function_runs_as_a_task() -> None:
    import inspect
    import sys

    if sys.version_info < (3, 12):
        pytest.skip("inspect.markcoroutinefunction is new in Python 3.12")

    def returns_awaitable() -> Any:
        return add(2, 3)

    marked = inspect.markcoroutinefunction(returns_awaitable)
    assert await fork(marked) == 5


async def test_a_sync_function_returning_a_coroutine_runs_it_as_a_coroutine_fork() -> None:
    # Its type (Future[int], by the coroutine overload) says so: see test_typing.py.
    def sneaky() -> Any:
        return add(1, 1)

    assert await fork(sneaky) == 2


async def test_a_coroutine_returned_by_a_sync_fork_can_be_cancelled_as_a_task() -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        future = fork(lambda: forever())
        await started.wait()
        assert future.cancel()
        with pytest.raises(anyfork.CancelledError):
            await future


@pytest.mark.parametrize("repeat", range(3))
async def test_forks_from_many_threads_at_once_all_resolve(repeat: int) -> None:
    async def square(x: int) -> int:
        await anyio.sleep(0)
        return x * x

    def forker(base: int) -> list[int]:
        futures = [fork(square, base + i) for i in range(20)]
        futures += [fork(blocking_add, base, i) for i in range(20)]
        return anyfork.wait_all(futures)

    async with anyfork.scope():
        outer = [fork(forker, 100 * t) for t in range(8)]
    for t, fut in enumerate(outer):
        base = 100 * t
        assert fut.value() == [(base + i) ** 2 for i in range(20)] + [base + i for i in range(20)]


@pytest.mark.timeout(60)
def test_forks_in_trio_guest_mode_on_an_asyncio_host_are_trios() -> None:
    # trio.lowlevel.start_guest_run runs trio's tasks inside asyncio callbacks: both an
    # asyncio loop and a trio run are visible in the thread, and sniffio says which one
    # runs the code (as anyio asks it). Before, anyfork took asyncio's: coroutine forks ran
    # as asyncio tasks and 'await fut' raised TypeError (trio got an asyncio future).
    result = run_script(
        """
        import asyncio, anyio, sniffio, trio, anyfork

        async def which_library():
            await anyio.sleep(0)
            return sniffio.current_async_library()

        async def trio_main():
            async with anyfork.scope():
                in_scope = anyfork.fork(which_library)
            ambient = anyfork.fork(which_library)
            sync = anyfork.fork(abs, -3)
            return await ambient, await sync, in_scope.value()

        async def asyncio_host():
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            trio.lowlevel.start_guest_run(
                trio_main,
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                done_callback=done.set_result,
            )
            host_fork = anyfork.fork(which_library)  # the host's own forks stay asyncio's
            outcome = await done
            return outcome.unwrap(), await host_fork

        print(asyncio.run(asyncio_host()))
        """,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(('trio', 3, 'trio'), 'asyncio')\n", result.stdout + result.stderr
