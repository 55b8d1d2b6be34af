"""configure(): eager mode, the worker-thread limit and the exit bound."""

from __future__ import annotations

import logging
import threading
import weakref

import anyio
import pytest

import anyfork

from .conftest import garbage_collector_disabled, logged_within, run_script


def test_configure_without_arguments_reads_the_settings() -> None:
    config = anyfork.configure()
    assert isinstance(config, anyfork.Config)
    assert config.worker_threads >= 1


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("8", TypeError), (True, TypeError)],
)
def test_worker_threads_must_be_a_positive_whole_number(
    bad: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="worker_threads must be a whole number"):
        anyfork.configure(worker_threads=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), ("5", TypeError), (True, TypeError), (float("nan"), ValueError)],
)
def test_exit_timeout_must_be_none_or_seconds(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="exit_timeout must be None or a number of seconds"):
        anyfork.configure(exit_timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        ("5", TypeError),
        (True, TypeError),
        (float("nan"), ValueError),
    ],
)
def test_worker_idle_timeout_must_be_none_or_positive_seconds(
    bad: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="worker_idle_timeout must be None or a number"):
        anyfork.configure(worker_idle_timeout=bad)  # type: ignore[arg-type]


def test_worker_idle_timeout_defaults_to_ten_seconds_and_can_be_turned_off() -> None:
    assert anyfork.configure().worker_idle_timeout == 10.0
    assert anyfork.configure(worker_idle_timeout=None).worker_idle_timeout is None
    assert anyfork.configure(worker_threads=3).worker_idle_timeout is None


def test_exit_timeout_can_be_unbounded_and_is_kept_when_left_out() -> None:
    assert anyfork.configure(exit_timeout=None).exit_timeout is None
    assert anyfork.configure(worker_threads=3).exit_timeout is None
    assert anyfork.configure(exit_timeout=2.5).exit_timeout == 2.5


def test_eager_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="eager must be True or False"):
        anyfork.configure(eager="yes")  # type: ignore[arg-type]


def test_eager_mode_runs_sync_forks_at_the_call_in_the_caller() -> None:
    anyfork.configure(eager=True)
    fut = anyfork.fork(threading.get_ident)
    assert fut.done()
    assert fut.value() == threading.get_ident()


def test_eager_mode_stores_errors_in_the_future() -> None:
    anyfork.configure(eager=True)
    fut = anyfork.fork(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.value()


@pytest.mark.anyio
async def test_eager_mode_still_schedules_coroutine_forks_on_a_running_loop() -> None:
    anyfork.configure(eager=True)

    async def work() -> int:
        await anyio.sleep(0)
        return 1

    fut = anyfork.fork(work)
    assert not fut.done()
    assert await fut == 1


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("thread", ["anyio worker thread", "sync fork"])
async def test_eager_mode_runs_a_coroutine_fork_from_a_loops_worker_thread_on_that_loop(
    thread: str,
) -> None:
    # Before: eager mode ran it under a brand-new loop (anyio.run in the worker thread), where
    # objects bound to the thread's own loop (an anyio.Event, a connection) fail.
    anyfork.configure(eager=True)
    token = anyio.lowlevel.current_token()
    ready = anyio.Event()

    async def uses_the_loop() -> bool:
        ready.set()  # bound to the test's loop
        return anyio.lowlevel.current_token() == token

    def in_thread() -> bool:
        return anyfork.wait(anyfork.fork(uses_the_loop))

    if thread == "anyio worker thread":
        assert await anyio.to_thread.run_sync(in_thread)
    else:
        anyfork.configure(eager=False)
        outer = anyfork.fork(in_thread)  # a sync fork: it runs in the worker pool
        anyfork.configure(eager=True)
        assert await outer
    assert ready.is_set()


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_the_worker_thread_limit_bounds_concurrent_sync_forks() -> None:
    anyfork.configure(worker_threads=2)
    lock = threading.Lock()
    running = peak = 0

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threading.Event().wait(0.02)
        with lock:
            running -= 1

    # a fresh loop picks up the new limit
    async with anyfork.scope():
        for _ in range(8):
            anyfork.fork(work)
    assert peak <= 2


@pytest.mark.parametrize("kind", ["sync", "coroutine"])
def test_a_failed_eager_fork_nobody_read_is_logged_and_freed_with_its_last_reference(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    anyfork.configure(eager=True)

    def fail() -> None:
        raise ValueError("eager failure")

    async def fail_async() -> None:
        raise ValueError("eager failure")

    with caplog.at_level(logging.ERROR, logger="anyfork"), garbage_collector_disabled():
        fut = anyfork.fork(fail if kind == "sync" else fail_async)
        assert fut.done()
        ref = weakref.ref(fut)
        del fut
        freed = ref() is None
    assert freed
    assert logged_within(caplog, "was never retrieved")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ANYFORK_WORKER_THREADS", "0", "ANYFORK_WORKER_THREADS must be a whole number >= 1"),
        ("ANYFORK_WORKER_THREADS", "-2", "ANYFORK_WORKER_THREADS must be a whole number >= 1"),
        ("ANYFORK_WORKER_THREADS", "many", "ANYFORK_WORKER_THREADS must be a whole number"),
        ("ANYFORK_EXIT_TIMEOUT", "-1", "ANYFORK_EXIT_TIMEOUT must be a number of seconds >= 0"),
        ("ANYFORK_EXIT_TIMEOUT", "nan", "ANYFORK_EXIT_TIMEOUT must be a number of seconds >= 0"),
        ("ANYFORK_EXIT_TIMEOUT", "soon", "ANYFORK_EXIT_TIMEOUT must be a number of seconds"),
        ("ANYFORK_EAGER", "maybe", "ANYFORK_EAGER must be 0 or 1 (or false/true, no/yes)"),
    ],
)
def test_a_bad_environment_variable_is_named_in_the_error(
    variable: str, value: str, message: str
) -> None:
    result = run_script("import anyfork", env={variable: value})
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: "), result.stderr
    assert message in last_line
    assert f"got {value!r}" in last_line
    assert "unset it" in last_line
