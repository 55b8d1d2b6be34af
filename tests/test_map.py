"""anyfork.map: results in input order (or completion order), at most ``limit`` forks in
flight, an error or leaving the loop cancels the rest, a million-item generator in bounded
memory; ``for`` in scripts and threads, ``async for`` on every backend.

Which forks start, finish or fail first is set by the tests (events the forks wait for),
never by sleeping and hoping. Where a sync fork must not start, the only worker thread is
held by a blocker, so the forks of the map queue behind it; a timed wait (which never runs
a fork in the waiting thread) on a fork made after them then proves they had their turn.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import anyfork
from anyfork._reports import flush_reports

from .conftest import run_in_thread, run_script

pytestmark = pytest.mark.timeout(60)


def double(x: int) -> int:
    return 2 * x


async def double_async(x: int) -> int:
    await anyio.sleep(0)
    return 2 * x


class Blocker:
    """Holds the only worker thread (``worker_threads=1``) until released, so that the sync
    forks made meanwhile stay queued."""

    def __init__(self) -> None:
        anyfork.configure(worker_threads=1)
        self.running = threading.Event()
        self.release = threading.Event()
        self.future = anyfork.fork(self._hold)
        assert self.running.wait(10), "the blocker did not start"

    def _hold(self) -> None:
        self.running.set()
        assert self.release.wait(20)

    def drain(self) -> None:
        """Release the worker and let it run every job queued so far (a fork made now, and
        waited for with a timeout, is run by the worker after them)."""
        self.release.set()
        self.future.wait(timeout=20)
        assert anyfork.fork(double, 1).wait(timeout=20) == 2


class Started:
    """Records which items a fork was started for, and how many are running."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[int] = []
        self.running = 0
        self.most_running = 0

    def enter(self, item: int) -> None:
        with self.lock:
            self.items.append(item)
            self.running += 1
            self.most_running = max(self.most_running, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


# --- order ---------------------------------------------------------------------------------


def test_results_come_in_input_order_even_when_later_items_finish_first() -> None:
    later_done = threading.Event()

    def work(item: int) -> int:
        if item == 0:
            assert later_done.wait(10)  # item 0 finishes after item 2
        if item == 2:
            later_done.set()
        return item

    assert list(anyfork.map(work, range(5), limit=3)) == [0, 1, 2, 3, 4]


def test_unordered_results_come_as_the_forks_finish() -> None:
    others_done = threading.Barrier(3)

    def work(item: int) -> int:
        if item:
            others_done.wait(10)  # items 1 and 2 finish before item 0 ends
            return item
        others_done.wait(10)
        assert finished.wait(10)
        return item

    finished = threading.Event()
    seen: list[int] = []
    for value in anyfork.map(work, range(3), ordered=False):
        seen.append(value)
        if len(seen) == 2:
            finished.set()
    assert sorted(seen[:2]) == [1, 2]
    assert seen[2] == 0


def test_several_iterables_stop_at_the_shortest_as_the_builtin_map_does() -> None:
    assert list(anyfork.map(pow, [1, 2, 3, 4], [2, 2, 2])) == [1, 4, 9]
    assert list(anyfork.map(pow, [], [2])) == []


def test_a_coroutine_function_is_mapped_from_a_script() -> None:
    assert list(anyfork.map(double_async, range(5))) == [0, 2, 4, 6, 8]
    assert sorted(anyfork.map(double_async, range(5), ordered=False, limit=2)) == [0, 2, 4, 6, 8]


def test_the_map_is_its_own_iterator_and_a_second_loop_carries_on() -> None:
    results = anyfork.map(double, range(6), limit=2)
    assert iter(results) is results
    for value in results:
        if value == 4:
            break
    assert list(results) == [6, 8, 10]
    assert list(results) == []


# --- bounded in flight ---------------------------------------------------------------------


def in_flight_bound_holds(limit: int, ordered: bool, *, coroutine: bool) -> tuple[int, int]:
    """Map 40 items, counting the forks started but not yet yielded at each yield; return the
    most seen, and the most running at once."""
    started = Started()

    def sync_work(item: int) -> int:
        started.enter(item)
        try:
            return item
        finally:
            started.leave()

    async def async_work(item: int) -> int:
        started.enter(item)
        try:
            await anyio.sleep(0.001)
            return item
        finally:
            started.leave()

    most_in_flight = 0
    yielded = 0
    func: Any = async_work if coroutine else sync_work
    for _ in anyfork.map(func, range(40), limit=limit, ordered=ordered):
        yielded += 1
        with started.lock:
            # The one just yielded counted until now.
            most_in_flight = max(most_in_flight, len(started.items) - yielded + 1)
    assert yielded == 40
    return most_in_flight, started.most_running


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("coroutine", [False, True], ids=["sync", "coroutine"])
def test_never_more_than_limit_forks_in_flight(ordered: bool, coroutine: bool) -> None:
    most_in_flight, most_running = in_flight_bound_holds(3, ordered, coroutine=coroutine)
    assert most_in_flight <= 3
    assert most_running <= 3


def test_a_sync_function_is_limited_to_worker_threads_by_default() -> None:
    anyfork.configure(worker_threads=4)
    most_in_flight, _ = in_flight_bound_holds(None, True, coroutine=False)  # type: ignore[arg-type]
    assert most_in_flight <= 4


@pytest.mark.anyio
async def test_a_coroutine_function_is_unbounded_by_default(anyio_backend: Any) -> None:
    count = 50
    all_started = anyio.Event()
    started: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        if len(started) == count:
            all_started.set()
        await all_started.wait()  # item 0 finishes only once every item has started
        return item

    with anyio.fail_after(20):
        assert [value async for value in anyfork.map(work, range(count))] == list(range(count))


@pytest.mark.anyio
async def test_async_for_keeps_at_most_limit_in_flight(anyio_backend: Any) -> None:
    started = Started()

    async def work(item: int) -> int:
        started.enter(item)
        try:
            await anyio.sleep(0.001)
            return item
        finally:
            started.leave()

    seen = []
    with anyio.fail_after(20):
        async for value in anyfork.map(work, range(30), limit=4, ordered=False):
            seen.append(value)
            assert len(started.items) - len(seen) + 1 <= 4
    assert sorted(seen) == list(range(30))
    assert started.most_running <= 4


# --- errors --------------------------------------------------------------------------------


def test_an_error_is_raised_at_its_item_after_the_results_before_it() -> None:
    def work(item: int) -> int:
        if item == 3:
            raise ValueError(f"bad item {item}")
        return item

    seen: list[int] = []
    results = anyfork.map(work, range(10), limit=2)
    with pytest.raises(ValueError, match="bad item 3"):
        for value in results:
            seen.append(value)
    assert seen == [0, 1, 2]
    assert list(results) == []  # the map is over


def test_an_error_cancels_the_queued_forks_so_they_never_start() -> None:
    blocker = Blocker()
    started = Started()

    def work(item: int) -> int:
        started.enter(item)
        if item == 0:
            raise ValueError("first")
        return item

    results = anyfork.map(work, range(10), limit=3)  # 0, 1, 2 queued behind the blocker
    with pytest.raises(ValueError, match="first"):
        next(results)  # item 0 runs here (no worker is free), and fails
    blocker.drain()
    assert started.items == [0]
    assert not [fork for fork in anyfork.pending() if fork.name.endswith("work")]


@pytest.mark.anyio
async def test_an_error_cancels_the_running_coroutine_forks(anyio_backend: Any) -> None:
    others_running = anyio.Event()
    started: list[int] = []
    cancelled: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        if len(started) == 3:  # the order the tasks start in is the backend's
            others_running.set()
        if item == 0:
            await others_running.wait()
            raise ValueError("first")
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise
        return item

    with anyio.fail_after(20):
        async with anyfork.scope():  # joins the forks: all are over after it
            with pytest.raises(ValueError, match="first"):
                async for _ in anyfork.map(work, range(10), limit=3):
                    pass
    assert sorted(started) == [0, 1, 2]  # items 3.. were never forked
    assert sorted(cancelled) == [1, 2]


@pytest.mark.anyio
async def test_unordered_raises_an_error_as_soon_as_it_happens(anyio_backend: Any) -> None:
    raised = anyio.Event()
    cancelled: list[int] = []

    async def work(item: int) -> int:
        if item == 1:
            raise ValueError("second item")
        try:
            await raised.wait()  # item 0 would come first in input order
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise
        return item

    with anyio.fail_after(20):
        async with anyfork.scope():
            with pytest.raises(ValueError, match="second item"):
                async for _ in anyfork.map(work, range(2), ordered=False):
                    pass
            raised.set()
    assert cancelled == [0]


def test_an_error_of_the_input_is_raised_at_its_place() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise KeyError("input broke")

    results = anyfork.map(double, items(), limit=5)
    assert next(results) == 2
    assert next(results) == 4
    with pytest.raises(KeyError, match="input broke"):
        next(results)


def test_a_fork_raising_stop_iteration_does_not_end_the_loop_silently() -> None:
    def work(item: int) -> int:
        if item == 1:
            raise StopIteration
        return item

    with pytest.raises(RuntimeError, match="raised StopIteration") as caught:
        list(anyfork.map(work, range(3)))
    assert isinstance(caught.value.__cause__, StopIteration)


def test_errors_of_the_forks_dropped_after_the_first_are_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def work(item: int) -> int:
        raise ValueError(f"item {item}")

    with pytest.raises(ValueError, match="item 0"):
        list(anyfork.map(work, range(5)))
    gc.collect()
    flush_reports()  # log what is queued now, in this thread
    assert "never retrieved" not in caplog.text


# --- leaving the loop ----------------------------------------------------------------------


def test_breaking_out_cancels_the_queued_forks() -> None:
    blocker = Blocker()
    started = Started()

    def work(item: int) -> int:
        started.enter(item)
        return item

    for value in anyfork.map(work, range(10), limit=3):
        assert value == 0
        break
    blocker.drain()
    assert started.items == [0]


def test_close_cancels_the_queued_forks_and_ends_the_iteration() -> None:
    blocker = Blocker()
    started = Started()

    def work(item: int) -> int:
        started.enter(item)
        return item

    results = anyfork.map(work, range(10), limit=3)
    results.close()
    results.close()  # harmless once closed
    assert list(results) == []
    assert "closed" in repr(results)
    blocker.drain()
    assert started.items == []


def test_a_map_never_iterated_and_dropped_cancels_its_forks() -> None:
    blocker = Blocker()
    started = Started()

    def work(item: int) -> int:
        started.enter(item)
        return item

    anyfork.map(work, range(10), limit=3)  # made, dropped at once
    blocker.drain()
    assert started.items == []


@pytest.mark.anyio
async def test_breaking_out_of_async_for_cancels_the_running_forks(anyio_backend: Any) -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        if item:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(item)
                raise
        return item

    with anyio.fail_after(20):
        async with anyfork.scope():
            async for value in anyfork.map(work, range(10), limit=3):
                assert value == 0
                break
    assert sorted(started) == [0, 1, 2]
    assert sorted(cancelled) == [1, 2]


@pytest.mark.anyio
async def test_cancelling_the_iterating_task_cancels_the_forks(anyio_backend: Any) -> None:
    cancelled: list[int] = []
    running: list[int] = []
    all_running = anyio.Event()

    async def work(item: int) -> int:
        running.append(item)
        if len(running) == 3:
            all_running.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise
        return item

    with anyio.fail_after(20):
        async with anyfork.scope():
            results = anyfork.map(work, range(10), limit=3)
            with anyio.CancelScope() as iterating:

                async def cancel_once_all_run() -> None:
                    await all_running.wait()
                    iterating.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_once_all_run)
                    async for _ in results:
                        pass
    assert sorted(cancelled) == [0, 1, 2]
    assert [value async for value in results] == []


@pytest.mark.anyio
async def test_aclose_cancels_the_forks(anyio_backend: Any) -> None:
    cancelled: list[int] = []
    running: list[int] = []
    both_running = anyio.Event()

    async def work(item: int) -> int:
        running.append(item)
        if len(running) == 2:
            both_running.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(item)
            raise
        return item

    with anyio.fail_after(20):
        async with anyfork.scope():
            results = anyfork.map(work, range(5), limit=2)
            await both_running.wait()
            await results.aclose()
    assert sorted(cancelled) == [0, 1]


def test_a_running_sync_fork_is_asked_to_stop_when_the_map_ends() -> None:
    check_cancelled = anyfork.check_cancelled
    running = threading.Event()
    stopped = threading.Event()

    def work(item: int) -> int:
        if item == 0:
            assert running.wait(10)
            raise ValueError("first")
        running.set()
        for _ in range(1000):
            try:
                check_cancelled()
            except anyfork.CancelledError:
                stopped.set()
                raise
            threading.Event().wait(0.01)
        return item

    with pytest.raises(ValueError, match="first"):
        list(anyfork.map(work, range(2)))
    assert stopped.wait(10)


# --- every backend, threads, scripts -------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_async_for_maps_sync_and_coroutine_functions(
    anyio_backend: Any, ordered: bool
) -> None:
    with anyio.fail_after(20):
        got_sync = [value async for value in anyfork.map(double, range(20), ordered=ordered)]
        got_async = [
            value async for value in anyfork.map(double_async, range(20), limit=5, ordered=ordered)
        ]
    expected = [2 * item for item in range(20)]
    if ordered:
        assert got_sync == got_async == expected
    else:
        assert sorted(got_sync) == sorted(got_async) == expected


@pytest.mark.anyio
async def test_async_for_keeps_the_loop_running_while_it_waits(anyio_backend: Any) -> None:
    gate = threading.Event()
    ticks = 0

    def work(item: int) -> int:
        assert gate.wait(10)
        return item

    async def tick_then_open() -> None:
        nonlocal ticks
        for _ in range(5):
            await anyio.sleep(0)
            ticks += 1
        gate.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick_then_open)
            assert [value async for value in anyfork.map(work, range(3))] == [0, 1, 2]
    assert ticks == 5


@pytest.mark.anyio
async def test_a_for_on_the_loop_runs_sync_forks_in_the_caller(anyio_backend: Any) -> None:
    loop_thread = threading.get_ident()
    threads = set(anyfork.map(lambda _: threading.get_ident(), range(3)))
    assert threads == {loop_thread}  # forked and waited for with no await between


@pytest.mark.anyio
async def test_a_for_on_the_loop_that_would_block_raises_naming_async_for(
    anyio_backend: Any,
) -> None:
    started: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        await anyio.sleep_forever()
        return item

    with anyio.fail_after(20):
        async with anyfork.scope():  # joins the forks: they must have been cancelled
            with pytest.raises(anyfork.WouldBlockError, match=r"async for result in anyfork\.map"):
                for _ in anyfork.map(work, range(2)):
                    pass
    assert started == []  # the map is over: its forks were cancelled before they ran


def test_maps_in_several_threads_at_once_each_get_their_own_results() -> None:
    barrier = threading.Barrier(4)

    def consume(offset: int, coroutine: bool) -> list[int]:
        barrier.wait(10)
        func: Any = double_async if coroutine else double
        return list(anyfork.map(func, range(offset, offset + 50), limit=3))

    outcomes: list[Any] = [None] * 4

    def run(index: int) -> None:
        outcomes[index] = run_in_thread(lambda: consume(index * 100, index % 2 == 1))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index, outcome in enumerate(outcomes):
        assert outcome == [2 * item for item in range(index * 100, index * 100 + 50)]


def test_a_map_in_a_sync_fork_gives_its_worker_back_while_it_waits() -> None:
    anyfork.configure(worker_threads=1)

    def outer() -> list[int]:
        return list(anyfork.map(double, range(10), limit=3))

    assert anyfork.fork(outer).wait(timeout=20) == [2 * item for item in range(10)]


def test_two_threads_iterating_one_map_at_once_is_refused() -> None:
    gate = threading.Event()
    inside = threading.Event()

    def work(item: int) -> int:
        inside.set()
        assert gate.wait(10)
        return item

    results = anyfork.map(work, range(3), limit=1)
    first = threading.Thread(target=lambda: next(results))
    first.start()
    assert inside.wait(10)
    with pytest.raises(RuntimeError, match="being iterated by another thread or task"):
        run_in_thread(lambda: next(results))
    gate.set()
    first.join(10)
    assert list(results) == [1, 2]  # the refused call did not end the map


def test_a_script_maps_without_any_loop_and_exits() -> None:
    result = run_script(
        """
        import anyio, anyfork

        async def double_async(x):
            await anyio.sleep(0)
            return 2 * x

        print(list(anyfork.map(lambda x: 2 * x, range(5))))
        print(list(anyfork.map(double_async, range(5), limit=2)))
        print(sorted(anyfork.map(double_async, range(5), ordered=False)))
        """,
        env={"ANYFORK_EXIT_TIMEOUT": "none"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["[0, 2, 4, 6, 8]"] * 3


def test_a_script_that_breaks_out_of_a_map_does_not_wait_for_the_rest_at_exit() -> None:
    result = run_script(
        """
        import anyio, anyfork

        async def work(x):
            if x:
                await anyio.sleep(3600)
            return x

        for value in anyfork.map(work, range(10), limit=4):
            print("got", value)
            break
        """,
        env={"ANYFORK_EXIT_TIMEOUT": "none"},  # a fork left running would hang the exit
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "got 0\n"


@pytest.mark.timeout(600)
def test_a_million_item_generator_runs_in_bounded_memory() -> None:
    """Peak RSS grows by less than 10 MB over 1,000,000 items (a list of that many futures
    takes hundreds of MB; of the results alone, some 40 MB)."""
    result = run_script(
        """
        import resource, anyfork

        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        def items(count):
            for item in range(count):
                yield item

        assert sum(anyfork.map(lambda x: x, items(10_000))) == 49_995_000  # warm up
        before = peak_mb()
        total = sum(anyfork.map(lambda x: x, items(1_000_000)))
        assert total == 499_999_500_000, total
        print(f"{before:.1f} {peak_mb():.1f}")
        """,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr
    before, after = (float(figure) for figure in result.stdout.split())
    print(f"peak RSS: {before:.1f} MB before, {after:.1f} MB after 1,000,000 items")
    assert after - before < 10, (before, after)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"limit": 0}, ValueError, r"limit must be a whole number >= 1, got 0"),
        ({"limit": -2}, ValueError, r"limit must be a whole number >= 1, got -2"),
        ({"limit": 2.5}, TypeError, r"limit must be a whole number >= 1, got float 2.5"),
        ({"limit": "4"}, TypeError, r"limit must be a whole number >= 1, got str '4'"),
        ({"limit": True}, TypeError, r"limit must be a whole number >= 1, got bool True"),
        ({"ordered": "no"}, TypeError, r"ordered must be True or False, got str 'no'"),
    ],
)
def test_bad_options_are_refused_at_the_call(kwargs: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        anyfork.map(double, range(3), **kwargs)


def test_bad_arguments_are_refused_at_the_call_naming_them() -> None:
    with pytest.raises(TypeError, match="at least one iterable"):
        anyfork.map(double)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="argument 3 is int 5, which is not iterable"):
        anyfork.map(pow, [1], 5)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="map\\(\\) takes a callable first, got int 5"):
        anyfork.map(5, [1])  # type: ignore[call-overload]

    async def agen(x: int) -> Any:
        yield x

    with pytest.raises(TypeError, match="async generator function"):
        anyfork.map(agen, [1])


def test_options_wrapped_callables_are_mapped() -> None:
    options = anyfork.options
    started = Started()

    def work(item: int) -> int:
        started.enter(item)
        try:
            return item
        finally:
            started.leave()

    wrapped = options(work, limit=2)
    assert list(anyfork.map(wrapped, range(20), limit=10)) == list(range(20))
    assert started.most_running <= 2
