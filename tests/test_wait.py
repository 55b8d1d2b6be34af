"""wait, wait_async, await, collect_all and wait_all, across threads and event loops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import weakref
from collections.abc import Callable

import anyio
import pytest

import anyfork
from anyfork import Future, fork

from .conftest import garbage_collector_disabled, run_in_thread, run_script
from .test_future import raised, traceback_length

pytestmark = pytest.mark.timeout(30)


@pytest.mark.anyio
async def test_await_a_future_completed_from_another_thread() -> None:
    fut: Future[str] = Future()
    threading.Timer(0.02, fut.set_result, args=("from a thread",)).start()
    with anyio.fail_after(10):
        assert await fut == "from a thread"
        assert await anyfork.wait_async(fut) == "from a thread"


@pytest.mark.anyio
async def test_many_tasks_await_one_future_and_see_the_same_outcome() -> None:
    fut: Future[object] = Future()
    payload = object()
    seen: list[object] = []

    async def waiter() -> None:
        seen.append(await fut)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(waiter)
        await anyio.sleep(0.01)
        fut.set_result(payload)
    assert seen == [payload] * 20


@pytest.mark.anyio
async def test_await_a_fork_made_on_another_loop() -> None:
    release = threading.Event()

    def loop_in_thread(box: list[Future[int]], ready: threading.Event) -> None:
        async def main() -> None:
            async def work() -> int:
                await anyio.to_thread.run_sync(release.wait, 10)
                return 7

            box.append(fork(work))
            ready.set()
            await box[0]

        anyio.run(main, backend="trio")

    box: list[Future[int]] = []
    ready = threading.Event()
    thread = threading.Thread(target=loop_in_thread, args=(box, ready))
    thread.start()
    await anyio.to_thread.run_sync(ready.wait, 10)
    release.set()
    with anyio.fail_after(10):
        assert await box[0] == 7
    await anyio.to_thread.run_sync(thread.join, 10)


def test_await_after_the_loop_that_ran_the_work_has_closed() -> None:
    async def make() -> Future[int]:
        async with anyfork.scope():
            fut = fork(lambda: 5)
        return fut

    fut = asyncio.run(make())
    assert asyncio.run(anyfork.wait_async(fut)) == 5
    assert anyio.run(anyfork.wait_async, fut, backend="trio") == 5


def test_a_future_made_in_a_script_can_be_awaited_in_asyncio_and_trio() -> None:
    async def work() -> str:
        await anyio.sleep(0.01)
        return "ok"

    fut_async = fork(work)
    fut_sync = fork(lambda: "sync ok")

    async def main() -> tuple[str, str]:
        return await fut_async, await fut_sync

    assert asyncio.run(main()) == ("ok", "sync ok")
    assert anyio.run(main, backend="trio") == ("ok", "sync ok")


def test_wait_rejects_what_is_not_a_future() -> None:
    with pytest.raises(TypeError, match="got NoneType None"):
        anyfork.wait(None)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"takes an anyfork\.Future"):
        anyfork.wait(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="wait_async"):
        asyncio.run(anyfork.wait_async("nope"))  # type: ignore[call-overload]


def test_wait_accepts_concurrent_futures() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert anyfork.wait(pool.submit(lambda: 3)) == 3
        failing = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            anyfork.wait(failing)
        assert asyncio.run(anyfork.wait_async(pool.submit(lambda: 4))) == 4


def test_a_cancelled_concurrent_future_raises_anyforks_cancelled_error() -> None:
    source: concurrent.futures.Future[int] = concurrent.futures.Future()
    source.cancel()
    with pytest.raises(anyfork.CancelledError):
        anyfork.wait(source)


def test_wait_timeout_raises_timeout_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TimeoutError):
        anyfork.wait(fut, timeout=0.05)


def test_wait_from_many_threads_at_once() -> None:
    fut: Future[int] = Future()
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(anyfork.wait(fut, timeout=10)))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    fut.set_result(9)
    for thread in threads:
        thread.join(10)
    assert results == [9] * 16


def test_collect_all_gives_the_futures_in_input_order() -> None:
    futs = [fork(lambda i=i: i * i) for i in range(5)]
    combined = anyfork.collect_all(futs)
    done = combined.wait(timeout=10)
    assert done == futs
    assert [f.value() for f in done] == [0, 1, 4, 9, 16]


def test_collect_all_of_nothing_is_done_with_an_empty_list() -> None:
    combined = anyfork.collect_all([])
    assert combined.done()
    assert combined.value() == []


def test_collect_all_never_fails_itself() -> None:
    failing: Future[int] = Future()
    failing.set_exception(ValueError())
    combined = anyfork.collect_all([failing])
    (only,) = combined.wait()
    with pytest.raises(ValueError):
        only.value()


@pytest.mark.anyio
async def test_collect_all_is_awaitable() -> None:
    async def value(i: int) -> int:
        await anyio.sleep(0.001 * i)
        return i

    done = await anyfork.collect_all([fork(value, i) for i in range(3)])
    assert [f.value() for f in done] == [0, 1, 2]


def test_collect_all_rejects_a_single_future() -> None:
    with pytest.raises(TypeError, match="list of futures"):
        anyfork.collect_all(Future())  # type: ignore[arg-type]


def test_wait_all_returns_values_in_input_order() -> None:
    futs = [fork(lambda i=i: i + 1) for i in range(10)]
    assert anyfork.wait_all(futs) == list(range(1, 11))


def test_wait_all_waits_for_everything_then_raises_the_first_failure_in_input_order() -> None:
    release = threading.Event()
    finished: list[str] = []

    def slow_ok() -> None:
        release.wait(10)
        finished.append("slow")

    def first_failure() -> None:
        raise KeyError("first")

    def second_failure() -> None:
        raise ValueError("second")

    futs = [fork(second_failure), fork(first_failure), fork(slow_ok)]
    futs[1], futs[0] = futs[0], futs[1]
    threading.Timer(0.05, release.set).start()
    with pytest.raises(KeyError, match="first"):
        anyfork.wait_all(futs)
    assert finished == ["slow"]
    with pytest.raises(ValueError):
        futs[1].value()


def test_wait_all_accepts_a_mix_of_future_kinds() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert anyfork.wait_all([fork(lambda: 1), pool.submit(lambda: 2)]) == [1, 2]


def test_wait_in_a_plain_thread_on_a_loop_fork() -> None:
    async def three() -> int:
        await anyio.sleep(0.01)
        return 3

    async def main() -> int:
        fut = fork(three)

        return await anyio.to_thread.run_sync(lambda: run_in_thread(fut.wait))

    assert anyio.run(main) == 3


def test_wait_all_runs_unstarted_sync_forks_in_the_waiting_thread() -> None:
    # A fresh interpreter: the script's worker pool is sized when first used.
    result = run_script(
        """
        import threading, anyfork

        anyfork.configure(worker_threads=1)
        ran_in = {}

        def job(index):
            ran_in[index] = threading.get_ident()
            threading.Event().wait(0.1)
            return index

        assert anyfork.wait_all([anyfork.fork(job, i) for i in range(3)]) == [0, 1, 2]
        # The lone worker is busy with the first job for 0.1 s; the last is the waiter's.
        print(ran_in[2] == threading.get_ident())
        """
    )
    assert result.stdout == "True\n", result.stderr


@pytest.mark.anyio
async def test_an_awaiting_task_wakes_when_an_earlier_done_callback_raises_keyboard_interrupt() -> (
    None
):
    fut: Future[int] = Future()

    def raising(_: Future[int]) -> None:
        raise KeyboardInterrupt

    fut.add_done_callback(raising)

    def complete() -> BaseException | None:
        try:
            fut.set_result(5)
        except BaseException as exc:  # returned: a KeyboardInterrupt must not reach pytest
            return exc
        return None

    async with anyio.create_task_group() as tg:
        seen: list[int] = []

        async def waiter() -> None:
            seen.append(await fut)

        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        raised = await anyio.to_thread.run_sync(run_in_thread, complete)
        with anyio.fail_after(5):
            while not seen:
                await anyio.sleep(0.01)
    assert isinstance(raised, KeyboardInterrupt)
    assert seen == [5]


async def await_and_catch(fut: Future[int], via_wait_async: bool) -> BaseException:
    try:
        if via_wait_async:
            await anyfork.wait_async(fut)
        else:
            await fut
    except BaseException as error:
        return error
    finally:
        del fut  # done with it, like a real reader (see test_future.read_and_catch)
    raise AssertionError("awaiting did not raise")


def a_failed_future() -> Future[int]:
    fut: Future[int] = Future()
    fut.set_exception(raised(ValueError("boom")))
    try:
        return fut
    finally:
        del fut  # the error's traceback keeps this frame alive (through raised()'s f_back)


@pytest.mark.anyio
@pytest.mark.parametrize("via_wait_async", [False, True], ids=["await", "wait_async"])
async def test_awaiting_a_failed_future_a_thousand_times_does_not_grow_its_traceback(
    via_wait_async: bool,
) -> None:
    fut = a_failed_future()
    once = traceback_length(await await_and_catch(fut, via_wait_async))
    for _ in range(1000):
        error = await await_and_catch(fut, via_wait_async)
    assert traceback_length(error) == once


@pytest.mark.anyio
@pytest.mark.parametrize("via_wait_async", [False, True], ids=["await", "wait_async"])
async def test_a_failed_future_that_was_awaited_is_freed_with_its_last_reference(
    via_wait_async: bool,
) -> None:
    with garbage_collector_disabled():
        fut = a_failed_future()
        await await_and_catch(fut, via_wait_async)
        ref = weakref.ref(fut)
        del fut
        freed = ref() is None
    assert freed


# --- timeouts beyond what a thread can wait ---------------------------------------------

HUGE_TIMEOUTS = [float("inf"), 1e300, threading.TIMEOUT_MAX * 2]


def wait_with_timeout(how: str, fut: Future[int], timeout: float) -> int:
    if how == "Future.wait":
        return fut.wait(timeout=timeout)
    if how == "anyfork.wait":
        return anyfork.wait(fut, timeout=timeout)
    (value,) = anyfork.wait_all([fut], timeout=timeout)
    return int(value)


@pytest.mark.parametrize("how", ["Future.wait", "anyfork.wait", "wait_all"])
@pytest.mark.parametrize("timeout", HUGE_TIMEOUTS, ids=["inf", "1e300", "twice TIMEOUT_MAX"])
@pytest.mark.parametrize("thread", ["main thread", "other thread"])
def test_a_timeout_beyond_what_threads_can_wait_means_no_bound(
    how: str, timeout: float, thread: str
) -> None:
    fut: Future[int] = Future()
    threading.Timer(0.05, fut.set_result, args=(4,)).start()
    if thread == "main thread":
        assert wait_with_timeout(how, fut, timeout) == 4
    else:
        assert run_in_thread(lambda: wait_with_timeout(how, fut, timeout)) == 4


@pytest.mark.parametrize("how", ["Future.wait", "anyfork.wait", "wait_all"])
@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("-inf")])
def test_nan_and_negative_timeouts_stay_rejected(how: str, bad: float) -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
        run_in_thread(lambda: wait_with_timeout(how, fut, bad))


# --- polling foreign futures (issue 17, item 17) -------------------------------------------


def memory_growth_of(poll: Callable[[], object], times: int) -> int:
    """Bytes still allocated after calling ``poll`` ``times`` times (after 100 warm-up calls)."""
    import tracemalloc

    for _ in range(100):
        poll()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(times):
            poll()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_polling_a_pending_concurrent_future_with_timed_waits_does_not_grow_memory() -> None:
    source: concurrent.futures.Future[int] = concurrent.futures.Future()

    def poll() -> None:
        with pytest.raises(TimeoutError):
            anyfork.wait(source, timeout=0)

    # Each poll used to leave a follower and a done callback behind (about 2 KB).
    assert memory_growth_of(poll, 3000) < 300_000
    source.set_result(7)
    assert anyfork.wait(source, timeout=30) == 7


# --- a StopIteration raised by the work (issue 17, item 18) --------------------------------


def raises_stop_iteration(error: StopIteration) -> None:
    raise error


@pytest.mark.anyio
async def test_awaiting_a_done_future_that_failed_with_stop_iteration_raises_that_object() -> None:
    error = StopIteration("the work's own")
    future = fork(raises_stop_iteration, error)
    with anyio.fail_after(10):
        while not future.done():
            await anyio.sleep(0.01)
    with pytest.raises(StopIteration) as waited:
        future.wait()
    assert waited.value is error
    with pytest.raises(StopIteration) as awaited:
        await future
    assert awaited.value is error


@pytest.mark.anyio
async def test_awaiting_a_pending_future_that_then_fails_with_stop_iteration() -> None:
    # Once the awaiting task is suspended, Python has no way to raise a StopIteration at
    # its await (a generator turns it into a RuntimeError, PEP 479, and Python 3.12+ takes
    # one thrown into an await for its return value): it must never come back as a value.
    # The RuntimeError says so, with the StopIteration as its cause.
    error = StopIteration("the work's own")
    future: Future[None] = Future()
    threading.Timer(0.05, future.set_exception, args=(error,)).start()
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="StopIteration") as caught:
        await future
    assert caught.value.__cause__ is error
    with pytest.raises(StopIteration) as awaited:
        await future  # done now
    assert awaited.value is error
