"""Behaviours of torch's test_futures.py and the eager half of test/jit/test_async.py,
re-expressed against anyfork (our own tests, same behaviours)."""

from __future__ import annotations

import threading
import time

import pytest

import anyfork
from anyfork import Future, fork

pytestmark = pytest.mark.timeout(30)


def add_one(x: int, *, scale: int = 1) -> int:
    return (x + 1) * scale


def test_wait_twice_gives_the_same_value() -> None:
    fut = fork(add_one, 1)
    assert anyfork.wait(fut) == 2
    assert anyfork.wait(fut) == 2
    assert fut.wait() == 2


def test_a_future_returned_to_the_caller_can_be_waited_there() -> None:
    def start_work() -> Future[int]:
        return fork(add_one, 41)

    assert anyfork.wait(start_work()) == 42


def test_fork_with_keyword_arguments_in_any_order() -> None:
    assert fork(add_one, scale=3, x=1).wait() == 6
    assert fork(add_one, 1, scale=3).wait() == 6


def test_nested_forks_in_a_script() -> None:
    def outer(x: int) -> int:
        inner = fork(add_one, x)
        return anyfork.wait(inner) * 2

    assert fork(outer, 1).wait() == 4


def test_forking_a_builtin_and_a_callable_object() -> None:
    class Linear:
        def __init__(self, weight: float) -> None:
            self.weight = weight

        def __call__(self, x: float) -> float:
            return self.weight * x

    assert fork(max, [3, 9, 2]).wait() == 9
    assert fork(Linear(2.0), 4.0).wait() == 8.0


def test_unwaited_forks_still_run() -> None:
    ran = threading.Event()
    fork(ran.set)
    assert ran.wait(10)


def test_then_chain_of_values() -> None:
    fut: Future[int] = Future()
    chained = fut.then(lambda f: f.value() + 1).then(lambda f: f.value() * 10)
    fut.set_result(1)
    assert chained.wait() == 20


def test_then_on_an_already_done_future_runs_at_once() -> None:
    fut: Future[str] = Future()
    fut.set_result("x")
    child = fut.then(lambda f: f.value() * 2)
    assert child.done()
    assert child.value() == "xx"


def test_error_set_on_a_future_reaches_a_reading_then_callback() -> None:
    fut: Future[int] = Future()
    child = fut.then(lambda f: f.wait() + 1)
    fut.set_exception(ValueError("set by hand"))
    with pytest.raises(ValueError, match="set by hand"):
        child.wait()


def test_collect_all_of_futures_completed_from_other_threads() -> None:
    futures: list[Future[int]] = [Future() for _ in range(5)]
    combined = anyfork.collect_all(futures)
    for index, fut in enumerate(futures):
        threading.Timer(0.01 * index, fut.set_result, args=(index,)).start()
    assert [f.value() for f in combined.wait(timeout=10)] == [0, 1, 2, 3, 4]


def test_wait_all_with_an_error_raises_it() -> None:
    good: Future[int] = Future()
    bad: Future[int] = Future()
    good.set_result(1)
    bad.set_exception(RuntimeError("bad"))
    with pytest.raises(RuntimeError, match="bad"):
        anyfork.wait_all([good, bad])


def test_a_runtime_error_of_the_work_is_not_an_anyfork_error() -> None:
    def fails() -> None:
        raise RuntimeError("the user's own")

    with pytest.raises(RuntimeError) as raised:
        fork(fails).wait()
    assert not isinstance(raised.value, anyfork.AnyforkError)


def test_forks_run_in_parallel_unlike_torch_eager_mode() -> None:
    started = time.perf_counter()
    futures = [fork(time.sleep, 0.2) for _ in range(4)]
    anyfork.wait_all(futures)
    assert time.perf_counter() - started < 0.75  # sequential would take 0.8 s
