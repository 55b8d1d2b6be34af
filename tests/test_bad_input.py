"""The bad-input catalogue: each mistake fails at the call, naming what was wrong and the fix.

Interpreter-exit and closed-loop cases need a fresh interpreter or a finished loop; they
live in test_shutdown.py (forking after the exit join began) and test_wait.py (awaiting a
fork whose loop has closed).
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import logging
import types
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import anyio
import pytest

import anyfork

from .conftest import run_script


async def coroutine_function() -> int:
    return 1


async def async_generator_function() -> AsyncIterator[int]:
    yield 1


@types.coroutine
def generator_based_coroutine() -> Generator[None, None, int]:
    yield
    return 1


class AsyncGeneratorCall:
    async def __call__(self) -> AsyncIterator[int]:
        yield 1


class CoroutineCall:
    async def __call__(self, fut: anyfork.Future[Any]) -> None:
        pass


async def coroutine_callback(fut: anyfork.Future[Any]) -> None:
    pass


def pending() -> anyfork.Future[Any]:
    return anyfork.Future()


def done() -> anyfork.Future[Any]:
    future: anyfork.Future[Any] = anyfork.Future()
    future.set_result(1)
    return future


def _middleware(**settings: Any) -> object:
    pytest.importorskip("fastapi")  # not installed on free-threaded Python (tests_freethreaded)
    from anyfork.fastapi import ForkScopeMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    return ForkScopeMiddleware(app, **settings)


CATALOGUE: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # fork
    ("fork a non-callable", lambda: anyfork.fork(42), TypeError, "fork() takes a callable"),
    ("fork None", lambda: anyfork.fork(None), TypeError, "fork() takes a callable, got NoneType"),
    (
        "fork a coroutine object",
        lambda: anyfork.fork(coroutine_function()),
        TypeError,
        "write fork(coroutine_function, ...) instead of fork(coroutine_function(...))",
    ),
    *(
        (
            f"fork {label}",
            lambda func=func: anyfork.fork(func),
            TypeError,
            "is an async generator function: calling it gives an async generator",
        )
        for label, func in [
            ("an async generator function", async_generator_function),
            ("a partial of one", functools.partial(async_generator_function)),
            ("a callable object whose __call__ is one", AsyncGeneratorCall()),
        ]
    ),
    *(
        (
            f"fork {label}",
            lambda func=func: anyfork.fork(func),
            TypeError,
            "is a generator-based coroutine (@types.coroutine): declare it with 'async def'",
        )
        for label, func in [
            ("a types.coroutine generator function", generator_based_coroutine),
            ("a partial of one", functools.partial(generator_based_coroutine)),
        ]
    ),
    # every wait form
    *(
        (
            f"{name} {label}",
            call,
            TypeError,
            f"{name}() takes an anyfork.Future, a concurrent.futures.Future or a "
            f"torch.futures.Future, got {got}",
        )
        for name, wrap in [
            ("wait", lambda bad: lambda: anyfork.wait(bad)),
            ("wait_all", lambda bad: lambda: anyfork.wait_all([done(), bad])),
            ("collect_all", lambda bad: lambda: anyfork.collect_all([bad])),
            ("as_completed", lambda bad: lambda: anyfork.as_completed([done(), bad])),
        ]
        for label, bad, got in [
            ("None", None, "NoneType None: did the function that should return the future"),
            ("an int", 3, "int 3"),
            ("a torch-like object", object(), "object <object"),
        ]
        for call in [wrap(bad)]
    ),
    (
        "wait a coroutine object",
        lambda: anyfork.wait(coroutine_function()),
        TypeError,
        "await a coroutine, or fork its coroutine function",
    ),
    ("wait_all None", lambda: anyfork.wait_all(None), TypeError, "takes a list of futures"),
    (
        "collect_all a single future",
        lambda: anyfork.collect_all(done()),
        TypeError,
        "takes a list of futures",
    ),
    (
        "as_completed a single future",
        lambda: anyfork.as_completed(done()),
        TypeError,
        "as_completed() takes a list of futures",
    ),
    # completion
    ("set_result twice", lambda: done().set_result(2), anyfork.AlreadyCompletedError, "once"),
    (
        "set_exception after set_result",
        lambda: done().set_exception(ValueError()),
        anyfork.AlreadyCompletedError,
        "a future completes only once",
    ),
    (
        "set_exception with a non-exception",
        lambda: pending().set_exception("oops"),  # type: ignore[arg-type]
        TypeError,
        "set_exception() takes an exception instance",
    ),
    (
        "set_exception with an exception class",
        lambda: pending().set_exception(ValueError),  # type: ignore[arg-type]
        TypeError,
        "set_exception() takes an exception instance",
    ),
    (
        "value of a pending future",
        lambda: pending().value(),
        anyfork.NotReadyError,
        "value() never blocks. Use wait() to block",
    ),
    # callbacks
    (
        "then with a non-callable",
        lambda: pending().then(1),  # type: ignore[arg-type]
        TypeError,
        "then() takes a callable that receives the done future, got int 1",
    ),
    *(
        (
            f"{method} with {label}",
            lambda method=method, callback=callback: getattr(pending(), method)(callback),
            TypeError,
            f"{method}() calls its callback in the thread that completes the future and "
            "cannot await it",
        )
        for method in ["then", "add_done_callback"]
        for label, callback in [
            ("a coroutine function", coroutine_callback),
            ("a partial of one", functools.partial(coroutine_callback)),
            ("a callable object whose __call__ is one", CoroutineCall()),
        ]
    ),
    (
        "Future with a positional name",
        lambda: anyfork.Future("job"),  # type: ignore[misc]
        TypeError,
        "Future() takes its name as a keyword: write Future(name='job')",
    ),
    (
        "add_done_callback with None",
        lambda: pending().add_done_callback(None),  # type: ignore[arg-type]
        TypeError,
        "add_done_callback() takes a callable",
    ),
    # timeouts
    *(
        (f"{name} with a negative timeout", call, ValueError, "timeout must be None or a number")
        for name, call in [
            ("Future.wait", lambda: pending().wait(timeout=-1)),
            ("wait", lambda: anyfork.wait(pending(), timeout=-0.5)),
            ("wait_all", lambda: anyfork.wait_all([pending()], timeout=-1)),
            ("as_completed", lambda: anyfork.as_completed([pending()], timeout=-1)),
        ]
    ),
    (
        "wait with a timeout that is not a number",
        lambda: anyfork.wait(pending(), timeout="1"),  # type: ignore[call-overload]
        TypeError,
        "timeout must be None or a number of seconds >= 0, got str '1'",
    ),
    # configuration
    (
        "configure a negative exit timeout",
        lambda: anyfork.configure(exit_timeout=-1),
        ValueError,
        "exit_timeout must be None or a number of seconds >= 0",
    ),
    (
        "configure a zero worker idle timeout",
        lambda: anyfork.configure(worker_idle_timeout=0),
        ValueError,
        "worker_idle_timeout must be None or a number of seconds > 0, got 0",
    ),
    (
        "configure zero worker threads",
        lambda: anyfork.configure(worker_threads=0),
        ValueError,
        "worker_threads must be a whole number >= 1",
    ),
    # flags: True or False only, a TypeError naming the argument and what it got
    *(
        (f"{name} {label}", call, TypeError, f"{argument} must be True or False, got {got}")
        for name, argument, make in [
            ("configure eager", "eager", lambda bad: lambda: anyfork.configure(eager=bad)),
            ("configure debug", "debug", lambda bad: lambda: anyfork.configure(debug=bad)),
            (
                "scope cancel_pending",
                "cancel_pending",
                lambda bad: lambda: anyfork.scope(cancel_pending=bad),
            ),
            (
                "ForkScopeMiddleware cancel_on_disconnect",
                "cancel_on_disconnect",
                lambda bad: lambda: _middleware(cancel_on_disconnect=bad),
            ),
        ]
        for label, bad, got in [("1", 1, "int 1"), ("'yes'", "yes", "str 'yes'")]
        for call in [make(bad)]
    ),
    # scopes
    (
        "a scope entered with a plain 'with'",
        lambda: anyfork.scope().__enter__(),
        TypeError,
        "use 'async with anyfork.scope():'",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(call, error, message, id=name) for name, call, error, message in CATALOGUE],
)
def test_bad_input_fails_at_the_call_with_a_clear_error(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        call()
    assert message in str(caught.value)


@pytest.mark.anyio
@pytest.mark.parametrize("bad", [None, 3, concurrent.futures.ThreadPoolExecutor])
async def test_wait_async_rejects_what_is_not_a_future(bad: object) -> None:
    with pytest.raises(TypeError, match=r"wait_async\(\) takes an anyfork.Future"):
        await anyfork.wait_async(bad)  # type: ignore[call-overload]


@pytest.mark.anyio
async def test_a_blocking_wait_on_the_loop_is_refused_not_a_freeze() -> None:
    with pytest.raises(anyfork.WouldBlockError, match="use 'await fut'"):
        anyfork.wait(pending())


@pytest.mark.anyio
async def test_fork_a_coroutine_object_on_a_loop_is_refused() -> None:
    with pytest.raises(TypeError, match="not a coroutine object"):
        anyfork.fork(coroutine_function())


def test_a_future_made_with_a_positional_name_reports_nothing_when_collected() -> None:
    result = run_script(
        """
        import gc, anyfork

        try:
            anyfork.Future("job")
        except TypeError as error:
            print(error)
        gc.collect()
        """
    )
    assert "write Future(name='job')" in result.stdout
    assert result.stderr == ""


def test_a_future_whose_init_did_not_run_reports_nothing_when_collected() -> None:
    result = run_script(
        """
        import gc, anyfork

        anyfork.Future.__new__(anyfork.Future)
        gc.collect()
        """
    )
    assert result.returncode == 0
    assert result.stderr == ""


def test_a_sync_fork_that_returns_an_async_generator_fails_with_a_clear_error() -> None:
    made: list[AsyncIterator[int]] = []

    def sneaky() -> AsyncIterator[int]:
        made.append(async_generator_function())
        return made[0]

    fut = anyfork.fork(sneaky)
    with pytest.raises(TypeError, match="returned an async generator"):
        fut.wait(timeout=10)


def test_a_then_callback_that_returns_a_coroutine_fails_the_child_and_closes_it() -> None:
    made: list[Any] = []

    def sneaky(fut: anyfork.Future[int]) -> Any:
        made.append(coroutine_callback(fut))
        return made[0]

    parent: anyfork.Future[int] = anyfork.Future()
    child = parent.then(sneaky)
    parent.set_result(1)
    with pytest.raises(TypeError, match="returned a coroutine"):
        child.value()
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED


def test_a_done_callback_that_returns_a_coroutine_is_logged_and_the_coroutine_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made: list[Any] = []

    def sneaky(fut: anyfork.Future[int]) -> Any:
        made.append(coroutine_callback(fut))
        return made[0]

    fut: anyfork.Future[int] = anyfork.Future()
    fut.add_done_callback(sneaky)
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        fut.set_result(1)
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED
    assert any("returned a coroutine" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_fork_an_async_generator_function_on_a_loop_is_refused() -> None:
    with pytest.raises(TypeError, match="is an async generator function"):
        anyfork.fork(async_generator_function)


@pytest.mark.anyio
async def test_a_sync_fork_on_a_loop_that_returns_an_async_generator_fails_clearly() -> None:
    made: list[AsyncIterator[int]] = []

    def sneaky() -> AsyncIterator[int]:
        made.append(async_generator_function())
        return made[0]

    with pytest.raises(TypeError, match="returned an async generator"):
        await anyfork.fork(sneaky)


# Every public entry point that takes seconds follows one rule: TypeError for a wrong type (a
# string read from a config file, a bool), ValueError for a wrong value (NaN, negative).
# Before, configure(exit_timeout="5") raised ValueError where wait(timeout="5") raised TypeError.
SECONDS_ENTRY_POINTS: list[tuple[str, Callable[[Any], object]]] = [
    ("Future.wait(timeout)", lambda bad: pending().wait(timeout=bad)),
    ("wait(timeout)", lambda bad: anyfork.wait(pending(), timeout=bad)),
    ("wait_all(timeout)", lambda bad: anyfork.wait_all([pending()], timeout=bad)),
    ("as_completed(timeout)", lambda bad: anyfork.as_completed([pending()], timeout=bad)),
    ("configure(exit_timeout)", lambda bad: anyfork.configure(exit_timeout=bad)),
    ("configure(worker_idle_timeout)", lambda bad: anyfork.configure(worker_idle_timeout=bad)),
    ("configure(slow_fork_warning)", lambda bad: anyfork.configure(slow_fork_warning=bad)),
    ("Scope.drain(timeout)", lambda bad: anyio.run(anyfork.Scope().drain, bad)),
]
try:
    import anyfork.fastapi
except ImportError:  # pragma: no cover - the fastapi extra is not installed
    pass
else:
    SECONDS_ENTRY_POINTS += [
        ("AppScope(grace_period)", lambda bad: anyfork.fastapi.AppScope(grace_period=bad)),
        (
            "lifespan(grace_period)",
            lambda bad: anyio.run(_enter_lifespan, bad),
        ),
    ]


async def _enter_lifespan(grace_period: Any) -> None:
    async with anyfork.fastapi.lifespan(object(), grace_period=grace_period):
        pass


@pytest.mark.parametrize(
    ("bad", "error"),
    [("5", TypeError), (True, TypeError), (float("nan"), ValueError), (-1, ValueError)],
    ids=["a str", "a bool", "NaN", "negative"],
)
@pytest.mark.parametrize(
    "call", [pytest.param(call, id=name) for name, call in SECONDS_ENTRY_POINTS]
)
def test_every_entry_point_that_takes_seconds_follows_one_rule(
    call: Callable[[Any], object], bad: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"must be (None or )?a number of seconds"):
        call(bad)


@pytest.mark.parametrize(("bad", "error"), [("8", TypeError), (2.5, TypeError), (0, ValueError)])
def test_configure_worker_threads_follows_the_same_rule(
    bad: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="worker_threads must be a whole number >= 1"):
        anyfork.configure(worker_threads=bad)  # type: ignore[arg-type]
