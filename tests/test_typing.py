"""Static typing of the public API. `nox -s typecheck` checks this file with mypy --strict
and pyright; pytest runs it too, so every assertion is also true at run time.

Wrong uses each carry an ignore comment, in functions never called: mypy (warn_unused_ignores)
and pyright (reportUnnecessaryTypeIgnoreComment, on for this file) fail if one is accepted."""
# pyright: reportUnnecessaryTypeIgnoreComment=true

from __future__ import annotations

import concurrent.futures
import importlib.util
import unittest
from collections.abc import Callable, Coroutine
from typing import Any, cast

import anyio
from typing_extensions import assert_type

import anyfork
from anyfork import AsCompleted, Future, MapIterator


async def scale(x: int, *, factor: float = 1.0) -> float:
    await anyio.sleep(0)
    return x * factor


def label(x: int) -> str:
    return str(x)


def test_fork_results_are_typed_from_the_forked_callable() -> None:
    assert_type(anyfork.fork(scale, 2, factor=1.5), Future[float])
    fut = assert_type(anyfork.fork(label, 3), Future[str])
    assert assert_type(anyfork.wait(fut), str) == "3"
    assert assert_type(fut.then(lambda f: len(f.value())), Future[int]).wait() == 1
    assert anyfork.wait_all([fut]) == ["3"]


async def fetch(x: int) -> str:
    await anyio.sleep(0)
    return f"fetched {x}"


def make_fetch() -> Coroutine[Any, Any, str]:  # a sync function that returns a coroutine
    return fetch(2)


def test_a_callable_that_returns_a_coroutine_is_typed_and_run_as_a_coroutine_fork() -> None:
    # Typed Future[str] by the coroutine overload, as the checkers must (a lambda cannot be
    # declared 'async def'); the coroutine it returns runs as a task, so the value is a str
    # at run time too. Before: "returned a coroutine from a worker thread" (TypeError).
    lambda_fork = assert_type(anyfork.fork(lambda: fetch(1)), Future[str])
    maker_fork = assert_type(anyfork.fork(make_fetch), Future[str])
    assert assert_type(anyfork.wait(lambda_fork, timeout=10), str) == "fetched 1"
    assert assert_type(maker_fork.wait(timeout=10), str) == "fetched 2"

    async def on_a_loop() -> tuple[str, str]:
        async with anyfork.scope():
            first = anyfork.fork(lambda: fetch(3))
            second = anyfork.fork(make_fetch)
            return assert_type(await first, str), await second

    assert anyio.run(on_a_loop) == ("fetched 3", "fetched 2")


def test_wait_all_and_collect_all_of_anyfork_futures_keep_the_value_type() -> None:
    first = anyfork.fork(label, 1)
    second: Future[str] = Future()
    second.set_result("2")
    assert assert_type(anyfork.wait_all([first, second]), list[str]) == ["1", "2"]
    assert assert_type(anyfork.wait_all((first,), timeout=10), list[str]) == ["1"]
    combined = assert_type(anyfork.collect_all([first, second]), Future[list[Future[str]]])
    assert [f.value() for f in combined.wait(timeout=10)] == ["1", "2"]


def test_wait_all_and_collect_all_of_foreign_futures_are_typed_any() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        foreign = pool.submit(label, 5)
        assert assert_type(anyfork.wait_all([foreign]), list[Any]) == ["5"]
        mixed = [anyfork.fork(label, 6), pool.submit(len, "ab")]
        assert assert_type(anyfork.wait_all(mixed), list[Any]) == ["6", 2]
        combined = assert_type(anyfork.collect_all(mixed), Future[list[Future[Any]]])
        assert len(combined.wait(timeout=10)) == 2


def test_wait_accepts_concurrent_futures_typed() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert assert_type(anyfork.wait(pool.submit(label, 5)), str) == "5"


def test_awaiting_gives_the_result_type() -> None:
    async def main() -> float:
        return assert_type(await anyfork.fork(scale, 2), float)

    assert anyio.run(main) == 2.0


def test_as_completed_yields_the_futures_it_was_given_typed() -> None:
    first = anyfork.fork(label, 1)
    iterator = assert_type(anyfork.as_completed([first]), AsCompleted[Future[str]])
    for future in iterator:
        assert assert_type(future.value(), str) == "1"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        foreign = pool.submit(label, 2)
        foreigns = anyfork.as_completed([foreign], timeout=10)
        assert_type(foreigns, AsCompleted[concurrent.futures.Future[str]])
        assert [assert_type(f, concurrent.futures.Future[str]) for f in foreigns] == [foreign]
        mixed = [anyfork.fork(label, 3), pool.submit(len, "ab")]
        # (mypy types the mixed list's items object, pyright their union: each picks an
        # overload that accepts it)
        assert len(list(anyfork.as_completed(mixed))) == 2


def test_async_for_over_as_completed_is_typed() -> None:
    async def main() -> list[float]:
        futures = [anyfork.fork(scale, n) for n in range(3)]
        return sorted(
            [assert_type(f, Future[float]).value() async for f in anyfork.as_completed(futures)]
        )

    assert anyio.run(main) == [0.0, 1.0, 2.0]


def test_the_fastapi_integration_is_typed() -> None:
    if importlib.util.find_spec("fastapi") is None:  # not installed on free-threaded Python
        raise unittest.SkipTest("fastapi is not installed")  # pytest skips; mypy needs no pytest
    import anyfork.fastapi
    from anyfork.fastapi import Policy, RequestScope

    policy: Policy = "detach"
    request = RequestScope(policy=policy)
    assert assert_type(request.policy, Policy) == "detach"
    assert_type(anyfork.fastapi.current_request_scope(), "RequestScope | None")
    dependency = anyfork.fastapi.fork_policy("cancel")
    assert callable(dependency)


def test_a_remote_function_keeps_its_signature_for_fork() -> None:
    if importlib.util.find_spec("distributed") is None:  # not installed on free-threaded Python
        raise unittest.SkipTest("distributed is not installed")
    import anyfork.dask
    from anyfork.dask import RemoteFunction

    remote_label = anyfork.dask.remote(label)
    with_options = anyfork.dask.remote(retries=1)(label)
    assert isinstance(with_options, RemoteFunction)
    assert assert_type(remote_label(3), str) == "3"  # called: runs here
    anyfork.configure(eager=True)  # forked in eager mode it runs here: no cluster needed
    assert assert_type(anyfork.wait(anyfork.fork(remote_label, 3)), str) == "3"
    assert assert_type(anyfork.fork(with_options, x=3), Future[str]).value() == "3"


@anyfork.options(limit=2, timeout=30)
async def limited_scale(x: int, *, factor: float = 1.0) -> float:
    await anyio.sleep(0)
    return x * factor


@anyfork.options
def bare_label(x: int) -> str:
    return str(x)


def test_options_keep_the_signature_for_calls_and_fork() -> None:
    wrapped = anyfork.options(label, retries=1)
    assert assert_type(wrapped(1), str) == "1"
    assert assert_type(bare_label(2), str) == "2"
    assert assert_type(anyfork.fork(wrapped, 3), Future[str]).wait(10) == "3"
    assert assert_type(anyfork.fork(bare_label, 4), Future[str]).wait(10) == "4"
    scaled = assert_type(anyfork.fork(limited_scale, 2, factor=1.5), Future[float])
    assert scaled.wait(10) == 3.0
    combined = anyfork.options(anyfork.options(label, limit=2), timeout=1)
    assert assert_type(anyfork.fork(combined, 5), Future[str]).wait(10) == "5"
    shared = anyfork.Limit(3)
    assert assert_type(shared.total, int) == 3


def _raises(call: Callable[[], object]) -> None:
    try:
        result = call()
        if isinstance(result, Future):
            cast("Future[object]", result).wait(10)
    except (TypeError, ValueError):
        return


def test_options_reject_wrong_argument_types() -> None:
    # mypy --strict (warn_unused_ignores) fails if any of these is accepted.
    wrapped = anyfork.options(label)
    _raises(lambda: anyfork.fork(wrapped, "not an int"))  # type: ignore[call-overload]
    _raises(lambda: wrapped("not an int"))  # type: ignore[arg-type]
    _raises(lambda: anyfork.fork(limited_scale, 1, factor="big"))  # type: ignore[arg-type]
    _raises(lambda: anyfork.options(label, limit="4"))  # type: ignore[call-overload]
    _raises(lambda: anyfork.options(label, retry_on=KeyboardInterrupt))  # type: ignore[arg-type]


def times(count: int, weight: float) -> float:
    return count * weight


async def join_three(a: str, b: int, c: bytes) -> str:
    await anyio.sleep(0)
    return f"{a}{b}{c.decode()}"


def test_map_yields_the_functions_return_type() -> None:
    labels = assert_type(anyfork.map(label, [1, 2]), MapIterator[str])
    assert [assert_type(text, str) for text in labels] == ["1", "2"]
    scaled = assert_type(anyfork.map(scale, range(2), limit=2), MapIterator[float])  # unwrapped
    assert list(scaled) == [0.0, 1.0]
    products = assert_type(
        anyfork.map(times, [2, 3], [2.0, 1.0], ordered=False), MapIterator[float]
    )
    assert sorted(products) == [3.0, 4.0]
    joined = assert_type(anyfork.map(join_three, ["a"], [1], [b"c"]), MapIterator[str])
    assert list(joined) == ["a1c"]

    def four(a: int, b: int, c: int, d: int) -> int:
        return a + b + c + d

    summed = assert_type(anyfork.map(four, [1], [2], [3], [4]), MapIterator[int])
    assert list(summed) == [10]


def test_async_for_over_map_is_typed() -> None:
    async def main() -> list[float]:
        return [assert_type(value, float) async for value in anyfork.map(scale, range(3))]

    assert anyio.run(main) == [0.0, 1.0, 2.0]


def never_called_wrong_uses_of_map() -> None:
    anyfork.map(label, ["not an int"])  # type: ignore[arg-type]
    anyfork.map(times, [2], ["not a float"])  # type: ignore[arg-type]
    anyfork.map(label, [1], limit="4")  # type: ignore[call-overload]
    text: int = next(anyfork.map(label, [1]))  # type: ignore[assignment]
    print(text)
