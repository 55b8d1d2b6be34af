"""as_completed: each future once, as it finishes, with ``for`` in threads and ``async for``
on every backend; an overall deadline; early breaks leave the work running; the loop-thread
rule of blocking waits; the same inputs and bad-input errors as wait_all.

The order of completion is set by the tests (events, hand-completed futures, a thread that
waits for the consumer's acknowledgement of each), never by sleeping and hoping.
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
import weakref
from typing import Any

import anyio
import pytest

import anyfork
from anyfork import Future

from .conftest import garbage_collector_disabled, run_in_thread
from .test_wait import a_failed_future

pytestmark = pytest.mark.timeout(30)


def pending(count: int) -> list[Future[int]]:
    return [Future(name=f"f{index}") for index in range(count)]


def finished(value: int) -> Future[int]:
    future: Future[int] = Future()
    future.set_result(value)
    return future


def complete_in_order_after_each_acknowledgement(
    futures: list[Future[int]], order: list[int], acknowledged: list[threading.Event]
) -> threading.Thread:
    """A thread that completes ``futures`` in ``order``, each only once the consumer has
    acknowledged the one before: the consumer is always waiting when the next one lands."""

    def complete() -> None:
        for step, index in enumerate(order):
            if step:
                assert acknowledged[step - 1].wait(10), "the consumer stopped acknowledging"
            futures[index].set_result(index)

    thread = threading.Thread(target=complete)
    thread.start()
    return thread


# --- for ------------------------------------------------------------------------------------


def test_each_future_is_yielded_once_in_the_order_they_complete() -> None:
    futures = pending(4)
    iterator = anyfork.as_completed(futures)
    for index in (2, 0, 3, 1):
        futures[index].set_result(index)
    assert [f.value() for f in iterator] == [2, 0, 3, 1]
    assert list(iterator) == []


def test_a_blocked_for_wakes_for_each_completion_from_another_thread() -> None:
    futures = pending(3)
    order = [1, 2, 0]
    acknowledged = [threading.Event() for _ in order]
    seen: list[int] = []
    iterator = anyfork.as_completed(futures)
    thread = complete_in_order_after_each_acknowledgement(futures, order, acknowledged)
    for step, future in enumerate(iterator):
        seen.append(future.value())
        acknowledged[step].set()
    thread.join(10)
    assert seen == order


def test_futures_completed_concurrently_from_many_threads_are_each_yielded_once() -> None:
    threads, per_thread = 8, 40
    futures = pending(threads * per_thread)
    iterator = anyfork.as_completed(futures)
    start = threading.Barrier(threads)

    def complete(chunk: list[Future[int]]) -> None:
        start.wait(10)
        for future in chunk:
            future.set_result(0)

    workers = [
        threading.Thread(target=complete, args=(futures[n * per_thread : (n + 1) * per_thread],))
        for n in range(threads)
    ]
    for worker in workers:
        worker.start()
    yielded = list(iterator)
    for worker in workers:
        worker.join(10)
    assert len(yielded) == len(futures)
    assert {id(f) for f in yielded} == {id(f) for f in futures}


def test_forks_are_yielded_as_they_finish() -> None:
    gates = [threading.Event() for _ in range(3)]

    def work(index: int) -> int:
        assert gates[index].wait(10)
        return index

    futures = [anyfork.fork(work, index) for index in range(3)]
    seen: list[int] = []
    gates[1].set()
    for future in anyfork.as_completed(futures, timeout=20):
        seen.append(future.value())
        if len(seen) == 1:
            gates[0].set()
        elif len(seen) == 2:
            gates[2].set()
    assert seen == [1, 0, 2]


def test_empty_input_yields_nothing() -> None:
    assert list(anyfork.as_completed([])) == []
    assert list(anyfork.as_completed([], timeout=0)) == []


def test_futures_already_done_are_yielded_first_in_input_order() -> None:
    late = pending(1)[0]
    done = [finished(1), finished(2)]
    iterator = anyfork.as_completed([late, *done])
    assert next(iterator) is done[0]
    assert next(iterator) is done[1]
    late.set_result(0)
    assert next(iterator) is late


def test_a_future_passed_twice_is_yielded_once() -> None:
    first, second = pending(2)
    iterator = anyfork.as_completed([first, second, first])
    first.set_result(1)
    second.set_result(2)
    assert list(iterator) == [first, second]


def test_failed_and_cancelled_futures_are_yielded_and_read_as_usual() -> None:
    failed, cancelled = pending(2)
    iterator = anyfork.as_completed([failed, cancelled])
    error = ValueError("bad")
    failed.set_exception(error)
    cancelled.cancel()
    first, second = iterator
    with pytest.raises(ValueError) as raised:
        first.value()
    assert raised.value is error
    assert second.cancelled()


def test_concurrent_futures_are_yielded_as_themselves() -> None:
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(gate.wait, 10)
        quick = pool.submit(lambda: "quick")
        assert quick.result(10) == "quick"
        cancelled: concurrent.futures.Future[str] = concurrent.futures.Future()
        cancelled.cancel()
        iterator = anyfork.as_completed([slow, quick, cancelled])
        assert next(iterator) is quick
        assert next(iterator) is cancelled
        gate.set()
        assert list(iterator) == [slow]
    assert slow.result() is True


def test_torch_futures_are_yielded_as_themselves() -> None:
    torch = pytest.importorskip("torch")
    source = torch.futures.Future()
    own = pending(1)[0]
    iterator = anyfork.as_completed([own, source])
    source.set_result(3)
    assert next(iterator) is source
    own.set_result(1)
    assert next(iterator) is own


# --- the deadline --------------------------------------------------------------------------


def test_the_timeout_raises_naming_how_many_futures_are_still_pending() -> None:
    done, *never = [finished(0), *pending(2)]
    iterator = anyfork.as_completed([done, *never], timeout=0.05)
    assert next(iterator) is done
    with pytest.raises(TimeoutError, match=r"2 of 3 futures were still pending"):
        next(iterator)


def test_the_timeout_is_one_deadline_counted_from_the_call() -> None:
    first, second = pending(2)
    iterator = anyfork.as_completed([first, second], timeout=0.1)
    first.set_result(1)
    time.sleep(0.15)  # the deadline passes while nobody iterates
    assert next(iterator) is first  # done before the deadline: still yielded
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"1 of 2 futures"):
        next(iterator)
    assert time.monotonic() - started < 0.05  # raised at once, not after another 0.1 s


def test_iterating_on_after_a_timeout_yields_what_finished_since() -> None:
    late = pending(1)[0]
    iterator = anyfork.as_completed([late], timeout=0.01)
    with pytest.raises(TimeoutError):
        next(iterator)
    late.set_result(1)
    assert list(iterator) == [late]


def test_a_timed_for_never_runs_a_fork_in_the_iterating_thread() -> None:
    ran_in: list[int] = []
    anyfork.configure(worker_threads=1)
    gate = threading.Event()
    blocker = anyfork.fork(gate.wait, 10)  # holds the only worker
    queued = anyfork.fork(lambda: ran_in.append(threading.get_ident()))

    def release_later() -> None:
        time.sleep(0.05)
        gate.set()

    threading.Thread(target=release_later).start()
    assert len(list(anyfork.as_completed([blocker, queued], timeout=10))) == 2
    assert ran_in and ran_in[0] != threading.get_ident()


def test_an_untimed_for_runs_a_queued_sync_fork_itself_rather_than_idle() -> None:
    anyfork.configure(worker_threads=1)
    gate = threading.Event()
    blocker = anyfork.fork(gate.wait, 10)  # holds the only worker
    queued = anyfork.fork(threading.get_ident)
    iterator = anyfork.as_completed([blocker, queued])
    assert next(iterator) is queued
    assert queued.value() == threading.get_ident()
    gate.set()
    assert next(iterator) is blocker


def test_a_fork_iterating_over_its_own_forks_gives_its_worker_back() -> None:
    # One worker, a timed 'for' (so nothing runs inline): the inner forks can only run if
    # the outer fork's thread gives its place in the pool back while it blocks.
    anyfork.configure(worker_threads=1)

    def outer() -> list[int]:
        inner = [anyfork.fork(lambda n=n: n) for n in range(3)]
        return sorted(f.value() for f in anyfork.as_completed(inner, timeout=10))

    assert anyfork.fork(outer).wait(timeout=20) == [0, 1, 2]


# --- breaking out early --------------------------------------------------------------------


def test_breaking_out_early_leaves_the_other_forks_running_to_completion() -> None:
    gate = threading.Event()
    quick = anyfork.fork(lambda: "quick")
    slow = [anyfork.fork(lambda n=n: gate.wait(10) and n) for n in range(3)]
    for future in anyfork.as_completed([*slow, quick]):
        assert future is quick
        break
    gate.set()
    assert anyfork.wait_all(slow, timeout=10) == [0, 1, 2]


def test_a_second_for_carries_on_where_the_first_stopped() -> None:
    futures = pending(3)
    iterator = anyfork.as_completed(futures)
    for index in (1, 0, 2):
        futures[index].set_result(index)
    for future in iterator:
        assert future is futures[1]
        break
    assert [f.value() for f in iterator] == [0, 2]


# --- the loop-thread rule ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_for_on_the_loop_yields_done_futures() -> None:
    done = [finished(1), finished(2)]
    assert list(anyfork.as_completed(done)) == done


@pytest.mark.anyio
async def test_a_for_on_the_loop_runs_sync_forks_not_started_yet_in_the_caller() -> None:
    futures = [anyfork.fork(threading.get_ident) for _ in range(3)]
    assert [f.value() for f in anyfork.as_completed(futures)] == [threading.get_ident()] * 3


async def coroutine_work() -> int:
    await anyio.sleep(0)
    return 1


@pytest.mark.anyio
async def test_a_for_on_the_loop_that_would_block_raises_naming_async_for() -> None:
    future = anyfork.fork(coroutine_work)
    done = finished(0)
    iterator = anyfork.as_completed([done, future])
    assert next(iterator) is done
    with pytest.raises(anyfork.WouldBlockError, match=r"1 of 2 .*'async for future in"):
        next(iterator)
    async for rest in iterator:  # the same iterator goes on without blocking
        assert rest is future
    assert await future == 1


@pytest.mark.anyio
async def test_a_timed_for_on_the_loop_never_runs_a_fork_inline() -> None:
    ran_in: list[int] = []
    future = anyfork.fork(lambda: ran_in.append(threading.get_ident()))
    with pytest.raises(anyfork.WouldBlockError):
        next(anyfork.as_completed([future], timeout=5))
    await future
    assert ran_in != [threading.get_ident()]


# --- async for -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_for_yields_each_future_once_as_threads_complete_them() -> None:
    futures = pending(4)
    order = [3, 1, 0, 2]
    acknowledged = [threading.Event() for _ in order]
    seen: list[int] = []
    thread = complete_in_order_after_each_acknowledgement(futures, order, acknowledged)
    with anyio.fail_after(10):
        async for future in anyfork.as_completed(futures):
            seen.append(future.value())
            acknowledged[len(seen) - 1].set()
    await anyio.to_thread.run_sync(thread.join, 10)
    assert seen == order


@pytest.mark.anyio
async def test_async_for_yields_coroutine_forks_as_they_finish() -> None:
    gates = [anyio.Event() for _ in range(3)]

    async def work(index: int) -> int:
        await gates[index].wait()
        return index

    order = [2, 0, 1]
    seen: list[int] = []
    async with anyfork.scope():
        futures = [anyfork.fork(work, index) for index in range(3)]
        gates[order[0]].set()
        with anyio.fail_after(10):
            async for future in anyfork.as_completed(futures):
                seen.append(await future)
                if len(seen) < len(order):
                    gates[order[len(seen)]].set()
    assert seen == order


@pytest.mark.anyio
async def test_async_for_keeps_the_loop_running_while_it_waits() -> None:
    futures = pending(2)
    ticks = 0

    async def complete_from_the_loop() -> None:
        nonlocal ticks
        for future in futures:
            for _ in range(3):
                await anyio.sleep(0)
                ticks += 1
            future.set_result(ticks)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(complete_from_the_loop)
            assert [f.value() async for f in anyfork.as_completed(futures)] == [3, 6]


@pytest.mark.anyio
async def test_async_for_over_many_threads_completing_at_once() -> None:
    threads, per_thread = 4, 50
    futures = pending(threads * per_thread)
    start = threading.Barrier(threads)

    def complete(chunk: list[Future[int]]) -> None:
        start.wait(10)
        for future in chunk:
            future.set_result(0)

    iterator = anyfork.as_completed(futures)
    workers = [
        threading.Thread(target=complete, args=(futures[n * per_thread : (n + 1) * per_thread],))
        for n in range(threads)
    ]
    for worker in workers:
        worker.start()
    with anyio.fail_after(10):
        yielded = [future async for future in iterator]
    for worker in workers:
        await anyio.to_thread.run_sync(worker.join, 10)
    assert len(yielded) == len(futures)
    assert {id(f) for f in yielded} == {id(f) for f in futures}


@pytest.mark.anyio
async def test_async_for_over_empty_and_already_done_inputs() -> None:
    assert [f async for f in anyfork.as_completed([])] == []
    done = [finished(1), finished(2)]
    assert [f async for f in anyfork.as_completed([*done, done[0]])] == done


@pytest.mark.anyio
async def test_async_for_times_out_naming_how_many_are_still_pending() -> None:
    done, never = finished(0), pending(1)[0]
    iterator = anyfork.as_completed([never, done], timeout=0.05)
    with anyio.fail_after(10):
        assert await iterator.__anext__() is done
        with pytest.raises(TimeoutError, match=r"1 of 2 futures were still pending"):
            await iterator.__anext__()


@pytest.mark.anyio
async def test_async_for_accepts_concurrent_futures() -> None:
    gate = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        source = pool.submit(gate.wait, 10)
        iterator = anyfork.as_completed([source])
        gate.set()
        with anyio.fail_after(10):
            assert [f async for f in iterator] == [source]
    finally:
        await anyio.to_thread.run_sync(pool.shutdown)  # it joins its thread: not on the loop


@pytest.mark.anyio
async def test_breaking_out_of_async_for_leaves_the_other_forks_running() -> None:
    gate = anyio.Event()

    async def slow(n: int) -> int:
        await gate.wait()
        return n

    async def quick() -> str:
        return "quick"

    async with anyfork.scope():
        others = [anyfork.fork(slow, n) for n in range(3)]
        first = anyfork.fork(quick)
        with anyio.fail_after(10):
            async for future in anyfork.as_completed([*others, first]):
                assert future is first
                break
            gate.set()
            assert [await f for f in others] == [0, 1, 2]


@pytest.mark.anyio
async def test_cancelling_the_iterating_task_leaves_the_futures_pending() -> None:
    futures = pending(2)
    with anyio.move_on_after(0.05):
        async for _ in anyfork.as_completed(futures):
            pass
    assert not any(f.done() for f in futures)
    futures[0].set_result(1)  # the cancelled waiter's wake-up was dropped: nothing breaks
    assert futures[0].value() == 1


def test_async_for_in_a_loop_of_another_thread_while_a_script_completes() -> None:
    futures = pending(2)
    started = threading.Event()

    async def consume() -> list[int]:
        iterator = anyfork.as_completed(futures)
        started.set()
        return [f.value() async for f in iterator]

    def run() -> list[int]:
        return anyio.run(consume, backend="trio")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(run)
        assert started.wait(10)
        futures[1].set_result(1)
        futures[0].set_result(0)
        assert result.result(10) == [1, 0]


# --- lifetimes ------------------------------------------------------------------------------


def test_a_failed_future_read_in_a_for_is_freed_with_its_last_reference() -> None:
    with garbage_collector_disabled():
        late: Future[int] = Future()
        failed = [a_failed_future(), late]
        refs = [weakref.ref(f) for f in failed]
        iterator = anyfork.as_completed(failed)
        late.set_exception(ValueError("late"))
        for future in iterator:
            try:
                future.value()
            except ValueError:
                pass
        del future, failed, late, iterator
        freed = all(ref() is None for ref in refs)
    assert freed


@pytest.mark.anyio
async def test_a_failed_future_read_in_an_async_for_is_freed_with_its_last_reference() -> None:
    with garbage_collector_disabled():
        late: Future[int] = Future()
        failed = [a_failed_future(), late]
        refs = [weakref.ref(f) for f in failed]
        iterator = anyfork.as_completed(failed)
        threading.Thread(target=late.set_exception, args=(ValueError("late"),)).start()
        with anyio.fail_after(10):
            async for future in iterator:
                try:
                    future.value()
                except ValueError:
                    pass
        del future, failed, late, iterator
        freed = all(ref() is None for ref in refs)
    assert freed


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("futures", "message"),
    [
        (42, r"as_completed\(\) takes a list of futures, got 42"),
        (None, r"as_completed\(\) takes a list of futures, got None"),
        (finished(1), r"takes a list of futures, got <anyfork.Future finished>"),
        ([finished(1), 42], r"as_completed\(\) takes an anyfork\.Future.*got int 42"),
        ([None], r"got NoneType None: did the function that should return the future"),
    ],
)
def test_what_is_not_a_list_of_futures_is_refused_naming_it(futures: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        anyfork.as_completed(futures)


def test_a_coroutine_in_the_list_is_refused_and_closed() -> None:
    coroutine = coroutine_work()
    with pytest.raises(TypeError, match="await a coroutine, or fork its coroutine function"):
        anyfork.as_completed([coroutine])
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning either


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError)]
)
def test_a_bad_timeout_is_refused_at_the_call(timeout: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout"):
        anyfork.as_completed([], timeout=timeout)


def test_the_repr_counts_the_pending_futures() -> None:
    first, second = pending(2)
    iterator = anyfork.as_completed([first, second])
    first.set_result(1)
    assert repr(iterator) == "<anyfork.AsCompleted 1 of 2 futures pending>"


def test_a_for_in_a_plain_thread() -> None:
    futures = [anyfork.fork(lambda n=n: n) for n in range(5)]
    consumed = run_in_thread(lambda: sorted(f.value() for f in anyfork.as_completed(futures)))
    assert consumed == [0, 1, 2, 3, 4]


# --- leaving the loop lets go of what it has not yielded (issue 17, item 16) ---------------


class Payload:
    """A result whose lifetime a test follows with a weak reference."""


def done_with_payloads(count: int) -> tuple[list[Future[Payload]], list[weakref.ref[Payload]]]:
    futures: list[Future[Payload]] = []
    refs: list[weakref.ref[Payload]] = []
    for _ in range(count):
        payload = Payload()
        refs.append(weakref.ref(payload))
        future: Future[Payload] = Future()
        future.set_result(payload)
        futures.append(future)
    return futures, refs


def test_breaking_out_of_for_lets_go_of_the_results_not_yielded() -> None:
    still_pending: Future[Payload] = Future()
    with garbage_collector_disabled():
        done, refs = done_with_payloads(5)
        for future in anyfork.as_completed([still_pending, *done]):
            break
        del done
        # The first done one is still held (the loop variable); the others are let go of,
        # while an input is pending.
        assert [ref() is None for ref in refs] == [False, True, True, True, True]
        del future
        assert all(ref() is None for ref in refs)
    still_pending.set_result(Payload())


def test_an_exception_out_of_for_lets_go_of_the_results_not_yielded() -> None:
    still_pending: Future[Payload] = Future()
    with garbage_collector_disabled():
        done, refs = done_with_payloads(5)
        with pytest.raises(ValueError, match="stop"):
            for _ in anyfork.as_completed([still_pending, *done]):
                raise ValueError("stop")
        del done
        # All but the first, which the loop variable holds.
        assert all(ref() is None for ref in refs[1:])


def test_an_abandoned_as_completed_iterator_lets_go_when_collected() -> None:
    still_pending: Future[Payload] = Future()
    done, refs = done_with_payloads(5)
    iterator = anyfork.as_completed([still_pending, *done])
    first = next(iterator)
    # A reference cycle keeps the iterator until the collector finds it.
    cycle: list[object] = [iterator]
    cycle.append(cycle)
    del done, iterator, cycle, first
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_an_iterator_still_held_keeps_its_results_for_the_next_loop() -> None:
    still_pending: Future[Payload] = Future()
    done, refs = done_with_payloads(3)
    iterator = anyfork.as_completed([still_pending, *done])
    for _ in iterator:
        break
    del done
    gc.collect()
    assert all(ref() is not None for ref in refs[1:])
    still_pending.set_result(Payload())
    assert len(list(iterator)) == 3


@pytest.mark.anyio
async def test_breaking_out_of_async_for_lets_go_of_the_results_not_yielded() -> None:
    still_pending: Future[Payload] = Future()
    with garbage_collector_disabled():
        done, refs = done_with_payloads(5)
        async for future in anyfork.as_completed([still_pending, *done]):
            break
        del done, future
        assert all(ref() is None for ref in refs)
        with pytest.raises(ValueError, match="stop"):
            done, refs = done_with_payloads(5)
            async for _ in anyfork.as_completed([still_pending, *done]):
                raise ValueError("stop")
        del done
        # All but the first, which the loop variable holds.
        assert all(ref() is None for ref in refs[1:])
