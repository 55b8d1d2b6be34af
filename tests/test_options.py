"""anyfork.options: limits, deadlines and retries that travel with the callable."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import anyio
import pytest

import anyfork
from anyfork import Limit, fork, options
from anyfork._cancel import stop_requested
from anyfork._remote import RemoteCallable

from .conftest import run_script

pytestmark = pytest.mark.timeout(60)


def double(x: int) -> int:
    return 2 * x


async def double_async(x: int) -> int:
    await anyio.sleep(0)
    return 2 * x


# --- the wrapper ----------------------------------------------------------------------------


def test_every_form_calls_the_function_unchanged_when_called_directly() -> None:
    @options
    def bare(x: int) -> int:
        return x + 1

    @options(limit=2)
    def with_arguments(x: int) -> int:
        return x + 2

    assert (bare(1), with_arguments(1), options(double, timeout=2)(3)) == (2, 3, 6)
    assert with_arguments.__name__ == "with_arguments"
    assert with_arguments.__wrapped__ is not None


def test_forking_a_wrapped_callable_runs_it_as_its_kind_of_fork() -> None:
    assert fork(options(double, retries=1), 4).wait(10) == 8
    assert fork(options(double_async, retries=1), 4).wait(10) == 8
    assert fork(options(double, limit=1, timeout=5), x=5).wait(10) == 10


def test_options_of_options_combine_the_outer_replacing_what_both_give() -> None:
    inner = options(double, limit=2, retries=3, name="inner")
    both = options(inner, timeout=1)
    assert both.func is double
    assert (both.limit, both.timeout, both.retries, both.name) == (inner.limit, 1, 3, "inner")
    replaced = options(inner, limit=5, retries=0)
    assert replaced.limit is not None and replaced.limit.total == 5
    assert (replaced.retries, replaced.timeout) == (0, None)
    assert fork(both, 2).wait(10) == 4


def test_a_fork_goes_by_the_name_option() -> None:
    release = threading.Event()
    future = fork(options(release.wait, name="model forward"), 10)
    assert future.name == "model forward"
    release.set()
    future.wait(10)


def test_a_decorated_method_binds_and_its_instances_share_one_limit() -> None:
    class Model:
        def __init__(self, scale: int) -> None:
            self.scale = scale

        @options(limit=1)
        def forward(self, x: int) -> int:
            return self.scale * x

    first, second = Model(2), Model(3)
    assert first.forward(5) == 10
    assert anyfork.wait_all([fork(first.forward, 1), fork(second.forward, 1)], timeout=10) == [
        2,
        3,
    ]
    assert first.forward.limit is second.forward.limit


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"limit": 0}, ValueError, "limit"),
        ({"limit": -2}, ValueError, "limit"),
        ({"limit": 1.5}, TypeError, "limit"),
        ({"limit": "4"}, TypeError, "limit"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": "2"}, TypeError, "timeout"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 1.0}, TypeError, "retries"),
        ({"retry_on": KeyboardInterrupt}, ValueError, "retry_on"),
        ({"retry_on": (ValueError, BaseException)}, ValueError, "retry_on"),
        ({"retry_on": "ValueError"}, TypeError, "retry_on"),
        ({"retry_on": (ValueError, 3)}, TypeError, "retry_on"),
        ({"retry_on": ()}, ValueError, "retry_on"),
        ({"name": 3}, TypeError, "name"),
    ],
)
def test_bad_options_raise_at_the_decoration_naming_the_parameter(
    arguments: dict[str, Any], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        options(double, **arguments)
    with pytest.raises(error, match=named):
        options(**arguments)


def test_a_callable_that_cannot_be_forked_is_rejected_at_the_decoration() -> None:
    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        options(agen)
    with pytest.raises(TypeError, match="callable"):
        options(3)  # type: ignore[call-overload]


# --- retries --------------------------------------------------------------------------------


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns the attempt number."""

    def __init__(self, failures: int, error: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"attempt {self.calls}")
        return self.calls


def test_a_listed_error_is_retried_exactly_retries_times_then_raised() -> None:
    flaky = Flaky(failures=10)
    future = fork(options(flaky, retries=3, retry_on=ConnectionError))
    with pytest.raises(ConnectionError, match="attempt 4") as caught:
        future.wait(10)
    assert flaky.calls == 4
    # The earlier attempts' errors are chained as __context__, and a note lists them.
    chain = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__context__
    assert chain == ["attempt 4", "attempt 3", "attempt 2", "attempt 1"]
    assert "attempt 4 of 4" in caught.value.__notes__[-1]


def test_a_retried_fork_that_succeeds_returns_its_value() -> None:
    flaky = Flaky(failures=2)
    assert fork(options(flaky, retries=2)).wait(10) == 3


def test_an_error_not_listed_is_not_retried() -> None:
    flaky = Flaky(failures=5, error=ValueError)
    with pytest.raises(ValueError):
        fork(options(flaky, retries=3, retry_on=ConnectionError)).wait(10)
    assert flaky.calls == 1


def test_a_keyboard_interrupt_is_never_retried() -> None:
    flaky = Flaky(failures=5, error=KeyboardInterrupt)
    future = fork(options(flaky, retries=3, retry_on=Exception))
    with pytest.raises(KeyboardInterrupt):
        anyfork.wait_all([future], timeout=10)  # a timed wait: it does not run it inline
    assert flaky.calls == 1


def test_a_cancellation_of_what_the_work_awaits_is_never_retried() -> None:
    calls = []

    def waits_for_a_cancelled_future() -> None:
        calls.append(1)
        cancelled: anyfork.Future[None] = anyfork.Future()
        cancelled.cancel()
        cancelled.wait()

    with pytest.raises(anyfork.CancelledError):
        fork(options(waits_for_a_cancelled_future, retries=3)).wait(10)
    assert calls == [1]


@pytest.mark.anyio
async def test_coroutine_forks_retry_on_every_backend() -> None:
    attempts = []

    @options(retries=2, retry_on=ConnectionError)
    async def flaky() -> int:
        attempts.append(1)
        await anyio.sleep(0)
        if len(attempts) < 3:
            raise ConnectionError(len(attempts))
        return len(attempts)

    assert await fork(flaky) == 3
    attempts.clear()

    @options(retries=5, retry_on=ConnectionError)
    async def other_error() -> None:
        attempts.append(1)
        raise KeyError("not listed")

    with pytest.raises(KeyError):
        await fork(other_error)
    assert attempts == [1]


def test_retries_stop_at_the_deadline() -> None:
    flaky = Flaky(failures=1000)

    def slow_failure() -> int:
        time.sleep(0.05)
        return flaky()

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fork(options(slow_failure, retries=1000, timeout=0.3)).wait(10)
    assert time.monotonic() - started < 5
    assert 2 <= flaky.calls < 20


def test_pending_shows_the_attempt_a_fork_is_at() -> None:
    second_attempt, release = threading.Event(), threading.Event()
    calls = []

    def fails_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError
        second_attempt.set()
        release.wait(10)

    future = fork(options(fails_once, retries=1))
    assert second_attempt.wait(10)
    (record,) = [record for record in anyfork.pending() if record.future is future]
    assert (record.attempt, record.state, record.kind) == (2, "running", "worker thread")
    release.set()
    future.wait(10)


# --- deadlines ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_coroutine_fork_past_its_deadline_is_cancelled_and_fails_with_timeout_error() -> (
    None
):
    cancelled = []

    @options(timeout=0.2)
    async def sleeper() -> None:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            cancelled.append(1)
            raise

    started = time.monotonic()
    future = fork(sleeper)
    with pytest.raises(TimeoutError, match=r"'.*sleeper'.*0\.2 seconds after fork\(\)"):
        await future
    late = time.monotonic() - started - 0.2
    assert cancelled == [1]
    # The target is within 50 ms of the deadline (bench_options.py measures it); a shared
    # machine gets a generous bound.
    assert -0.01 < late < 1.0


def test_a_coroutine_fork_with_no_loop_gets_its_deadline_on_the_background_loop() -> None:
    @options(timeout=0.1)
    async def sleeper() -> None:
        await anyio.sleep(30)

    with pytest.raises(TimeoutError):
        fork(sleeper).wait(10)


def test_a_queued_sync_fork_past_its_deadline_never_starts() -> None:
    limit = Limit(1)
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    held = fork(options(hold, limit=limit))
    assert started.wait(10)
    ran = threading.Event()
    late = fork(options(ran.set, limit=limit, timeout=0.1))
    with pytest.raises(TimeoutError):
        late.wait(10)
    assert limit.waiting == 0
    release.set()
    held.wait(10)
    fork(options(lambda: None, limit=limit)).wait(10)  # the line has moved past it
    assert not ran.is_set()


@pytest.mark.anyio
async def test_a_queued_coroutine_fork_past_its_deadline_never_starts() -> None:
    limit = Limit(1)
    release = anyio.Event()
    ran = []

    @options(limit=limit)
    async def hold() -> None:
        await release.wait()

    @options(limit=limit, timeout=0.1)
    async def late() -> None:
        ran.append(1)

    held = fork(hold)
    with pytest.raises(TimeoutError):
        await fork(late)
    release.set()
    await held
    assert ran == []
    assert (limit.running, limit.waiting) == (0, 0)


def test_a_running_sync_fork_past_its_deadline_is_asked_to_stop_and_its_result_discarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release, finished = threading.Event(), threading.Event()
    limit = Limit(1)

    def never_checks() -> str:
        release.wait(30)
        finished.set()
        return "late"

    future = fork(options(never_checks, timeout=0.1, limit=limit))
    with caplog.at_level(logging.DEBUG, logger="anyfork"):
        with pytest.raises(TimeoutError):
            future.wait(10)
        assert stop_requested(future)
        assert limit.running == 1  # its work still runs, and holds its place
        release.set()
        assert finished.wait(10)
        deadline = time.monotonic() + 10
        while limit.running and time.monotonic() < deadline:
            time.sleep(0.005)
    assert limit.running == 0
    with pytest.raises(TimeoutError):
        future.value()
    late = [record for record in caplog.records if "discarded" in record.getMessage()]
    assert len(late) == 1 and late[0].levelno == logging.DEBUG


def test_the_exit_join_waits_once_for_a_timed_out_sync_fork_that_runs_on(tmp_path: Any) -> None:
    marker = tmp_path / "finished"
    result = run_script(
        f"""
        import time, anyfork

        def runs_on():
            time.sleep(0.5)
            open({str(marker)!r}, "w").write("done")
            return "late"

        future = anyfork.fork(anyfork.options(runs_on, timeout=0.05))
        try:
            future.wait()
        except TimeoutError:
            print("timed out", flush=True)
        print("pending", [(p.name, p.state) for p in anyfork.pending()], flush=True)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "timed out" in result.stdout
    assert "pending []" in result.stdout  # the fork is over for anyfork.pending()
    assert marker.read_text() == "done"  # but the exit join waited for its work
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr


def test_deadlines_count_from_the_fork_call_including_the_time_queued() -> None:
    limit = Limit(1)
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    held = fork(options(hold, limit=limit))
    assert started.wait(10)
    queued = fork(options(time.sleep, limit=limit, timeout=0.3), 0.2)
    time.sleep(0.2)
    release.set()  # it starts with 0.1 s left: its 0.2 s of work cannot finish in time
    with pytest.raises(TimeoutError):
        queued.wait(10)
    held.wait(10)


# --- cancellation, scopes -------------------------------------------------------------------


def test_cancel_on_a_running_options_fork_returns_false_as_for_any_running_sync_fork() -> None:
    started, release = threading.Event(), threading.Event()

    def work() -> int:
        started.set()
        release.wait(10)
        return 1

    future = fork(options(work, retries=1))
    assert started.wait(10)
    assert not future.cancel()
    release.set()
    assert future.wait(10) == 1


@pytest.mark.anyio
async def test_a_scope_joins_options_forks_and_its_cancel_ends_queued_ones() -> None:
    limit = Limit(1)
    ran = []

    @options(limit=limit)
    async def hold() -> None:
        await anyio.sleep(30)

    def record() -> None:
        ran.append(1)

    async with anyfork.scope() as scope:
        held = fork(hold)
        queued = fork(options(record, limit=limit))
        await anyio.sleep(0.01)
        scope.cancel()
    assert held.cancelled() and queued.cancelled()
    assert ran == []
    assert (limit.running, limit.waiting) == (0, 0)


# --- remote callables -----------------------------------------------------------------------


class InThread(RemoteCallable):
    """A remote callable whose 'cluster' is a plain thread: it runs the call there."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.sent = 0

    def __call__(self, *args: Any) -> Any:
        return self.func(*args)

    def fork_remotely(self, future: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.sent += 1

        def run() -> None:
            try:
                future.set_result(self.func(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run).start()


def test_a_remote_callable_honours_options_the_same_way() -> None:
    flaky = Flaky(failures=2)
    remote = InThread(lambda: flaky())
    assert fork(options(remote, retries=2)).wait(10) == 3
    assert remote.sent == 3
    counter_lock = threading.Lock()
    running, most = [0], [0]

    def counted() -> None:
        with counter_lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.005)
        with counter_lock:
            running[0] -= 1

    limited = options(InThread(counted), limit=2)
    anyfork.wait_all([fork(limited) for _ in range(12)], timeout=30)
    assert most[0] <= 2


def test_anyfork_map_honours_the_options_of_the_callable_it_forks() -> None:
    assert list(anyfork.map(options(double_async, retries=1), [1, 2, 3])) == [2, 4, 6]
    lock, running, most = threading.Lock(), [0], [0]

    @options(limit=2)
    def counted(x: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return x

    assert list(anyfork.map(counted, range(20), limit=8)) == list(range(20))
    assert most[0] <= 2


def test_debug_mode_names_the_attempt_of_a_slow_retried_fork(
    caplog: pytest.LogCaptureFixture,
) -> None:
    anyfork.configure(debug=True, slow_fork_warning=0.2)
    second_attempt, release = threading.Event(), threading.Event()
    calls = []

    def fails_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError
        second_attempt.set()
        release.wait(30)

    with caplog.at_level(logging.WARNING, logger="anyfork"):
        future = fork(options(fails_once, retries=1))
        assert second_attempt.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            "pending for" in record.getMessage() for record in caplog.records
        ):
            time.sleep(0.05)
        release.set()
        future.wait(10)
    [message] = [r.getMessage() for r in caplog.records if "pending for" in r.getMessage()]
    assert "(worker thread, running, attempt 2)" in message
