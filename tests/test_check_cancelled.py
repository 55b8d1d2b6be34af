"""Cancellation a running sync fork can see: ``anyfork.check_cancelled()``,
``anyfork.cancelled()`` and ``anyio.from_thread.check_cancelled()`` inside sync forks asked
to stop by ``fut.cancel()``, their scope, an enclosing anyio cancel scope, or the sync fork
that made them. (A real server whose client disconnects: tests/test_fastapi_server.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import anyio.from_thread
import pytest

import anyfork
from anyfork import _cancel

from .conftest import run_in_thread, run_script

pytestmark = pytest.mark.timeout(60)

CHECKS: dict[str, Callable[[], None]] = {
    "anyfork": anyfork.check_cancelled,
    "anyio": anyio.from_thread.check_cancelled,
}


class Loop:
    """A sync fork's work: one step per iteration, checking first, until asked to stop.

    ``steps_at(n)`` waits (blocking) until it has done ``n`` steps; ``after_stop`` is how
    many steps it had done when it saw the request, and ``seen`` the exception it saw.
    """

    def __init__(self, check: Callable[[], None] = anyfork.check_cancelled) -> None:
        self.check = check
        self.steps = 0
        self.seen: BaseException | None = None
        self._progress = threading.Condition()

    def __call__(self, step_seconds: float = 0.005) -> str:
        while True:
            try:
                self.check()
            except BaseException as exc:
                self.seen = exc
                raise
            with self._progress:
                self.steps += 1
                self._progress.notify_all()
            time.sleep(step_seconds)  # a layer, a generation step
            if self.steps > 20_000:  # about 100 s: never asked to stop
                return "never asked to stop"

    def steps_at(self, count: int, timeout: float = 30) -> int:
        with self._progress:
            assert self._progress.wait_for(lambda: self.steps >= count, timeout), self.steps
            return self.steps


async def steps_at(work: Loop, count: int, timeout: float = 30) -> int:
    """``work.steps_at`` without blocking the loop."""
    with anyio.fail_after(timeout):
        while work.steps < count:
            await anyio.sleep(0.002)
    return work.steps


# --- outside a sync fork ----------------------------------------------------------------


def test_outside_a_sync_fork_check_cancelled_returns_none_and_cancelled_is_false() -> None:
    assert anyfork.check_cancelled() is None
    assert anyfork.cancelled() is False
    assert run_in_thread(lambda: (anyfork.check_cancelled(), anyfork.cancelled())) == (
        None,
        False,
    )


@pytest.mark.anyio
async def test_in_a_coroutine_and_a_coroutine_fork_check_cancelled_returns_none() -> None:
    async def in_a_task() -> tuple[None, bool]:
        return anyfork.check_cancelled(), anyfork.cancelled()

    assert await in_a_task() == (None, False)
    assert await anyfork.fork(in_a_task) == (None, False)


def test_a_sync_fork_not_asked_to_stop_runs_to_the_end() -> None:
    def work() -> list[bool]:
        seen = []
        for _ in range(3):
            anyfork.check_cancelled()
            seen.append(anyfork.cancelled())
        return seen

    assert anyfork.fork(work).wait() == [False, False, False]


# --- fut.cancel() -----------------------------------------------------------------------


@pytest.mark.parametrize("repeat", range(3))
def test_cancel_on_a_running_sync_fork_returns_false_and_stops_it_within_one_step(
    repeat: int,
) -> None:
    work = Loop()
    fut = anyfork.fork(work)
    work.steps_at(3)
    assert fut.cancel() is False  # running: it cannot be interrupted, only asked
    asked_at = work.steps
    with pytest.raises(anyfork.CancelledError) as raised:
        fut.wait(timeout=30)
    assert work.steps <= asked_at + 1  # the step under way ends, the next check raises
    assert fut.cancelled() and fut.done()
    assert isinstance(work.seen, anyfork.CancelledError)
    # Why it was cancelled, without the work's frames.
    assert raised.value.__cause__ is work.seen
    assert work.seen.__traceback__ is None
    assert "asked to stop" in str(work.seen)


def test_cancelled_turns_true_and_work_that_returns_keeps_its_result() -> None:
    started = threading.Event()

    def partial_generation() -> list[int]:
        tokens: list[int] = []
        started.set()
        while not anyfork.cancelled():
            tokens.append(len(tokens))
            time.sleep(0.002)
        return tokens  # keep what was generated so far

    fut = anyfork.fork(partial_generation)
    assert started.wait(30)
    assert fut.cancel() is False
    tokens = fut.wait(timeout=30)
    assert tokens == list(range(len(tokens)))
    assert not fut.cancelled()


def test_a_cancellation_the_fork_was_not_asked_for_fails_it_as_before() -> None:
    other: anyfork.Future[int] = anyfork.Future()
    other.cancel()

    fut = anyfork.fork(other.wait)  # raises anyfork.CancelledError, nobody asked it to stop
    with pytest.raises(anyfork.CancelledError):
        fut.wait(timeout=30)
    assert not fut.cancelled()  # failed: the error is the work's own


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
async def test_cancel_from_the_loop_stops_a_sync_fork_of_the_loop(check: str) -> None:
    work = Loop(CHECKS[check])
    fut = anyfork.fork(work)
    await steps_at(work, 3)
    assert fut.cancel() is False
    asked_at = work.steps
    with anyio.fail_after(30), pytest.raises(anyfork.CancelledError):
        await fut
    assert fut.cancelled()
    assert work.steps <= asked_at + 1
    if check == "anyio":  # the loop's own cancellation exception, as in to_thread.run_sync
        assert isinstance(work.seen, anyio.get_cancelled_exc_class())
    else:
        assert isinstance(work.seen, anyfork.CancelledError)


# --- the scope ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
async def test_a_scope_cancel_stops_its_running_sync_forks(check: str) -> None:
    works = [Loop(CHECKS[check]) for _ in range(3)]
    with anyio.fail_after(30):
        async with anyfork.scope() as scope:
            futures = [anyfork.fork(work) for work in works]
            for work in works:
                await steps_at(work, 2)
            scope.cancel()
            asked_at = [work.steps for work in works]
    # The scope's exit joined them: all stopped, each within one step.
    assert all(fut.cancelled() for fut in futures)
    assert all(work.steps <= at + 1 for work, at in zip(works, asked_at))


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
async def test_an_enclosing_cancel_scope_stops_the_scopes_running_sync_forks(check: str) -> None:
    work = Loop(CHECKS[check])
    with anyio.fail_after(30):
        with anyio.CancelScope() as outer:
            async with anyfork.scope():
                fut = anyfork.fork(work)
                await steps_at(work, 3)
                outer.cancel()
                asked_at = work.steps
                await fut
    assert outer.cancelled_caught
    assert fut.cancelled()
    assert work.steps <= asked_at + 1


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
async def test_move_on_after_around_a_scope_stops_its_sync_forks_at_the_deadline(
    check: str,
) -> None:
    work = Loop(CHECKS[check])
    started = time.monotonic()
    with anyio.fail_after(30):
        with anyio.move_on_after(0.3) as deadline:
            async with anyfork.scope():
                fut = anyfork.fork(work)
                await fut
    assert deadline.cancelled_caught
    assert fut.cancelled()
    assert time.monotonic() - started < 10  # stopped soon after 0.3 s, however loaded
    assert work.steps >= 1


@pytest.mark.anyio
async def test_forks_outside_any_scope_do_not_follow_the_callers_cancel_scope() -> None:
    # A fork made outside a scope belongs to the loop, not to the caller's cancel scope:
    # like a coroutine fork there, it outlives a cancelled caller.
    work = Loop()
    with anyio.move_on_after(0.05):
        fut = anyfork.fork(work)
        await fut
    await steps_at(work, work.steps + 2)
    assert not fut.done()
    fut.cancel()
    with anyio.fail_after(30), pytest.raises(anyfork.CancelledError):
        await fut


# --- forks made by a sync fork ----------------------------------------------------------


def test_a_stop_request_reaches_the_sync_forks_the_fork_made() -> None:
    children = [Loop(), Loop()]
    made: list[anyfork.Future[str]] = []

    def parent() -> list[str]:
        made.extend(anyfork.fork(child) for child in children)
        return anyfork.wait_all(made)  # blocks: only the children can see the request

    fut = anyfork.fork(parent)
    for child in children:
        child.steps_at(2)
    assert fut.cancel() is False
    asked_at = [child.steps for child in children]
    with pytest.raises(anyfork.CancelledError):
        fut.wait(timeout=30)
    # The children stopped (their CancelledError reached the parent through wait_all),
    # and the parent, asked to stop and letting it propagate, ended cancelled too.
    assert fut.cancelled()
    assert all(child.cancelled() for child in made)
    assert all(child.steps <= at + 1 for child, at in zip(children, asked_at))


def test_a_fork_made_after_its_parent_was_asked_to_stop_sees_it_at_its_first_check() -> None:
    checking = Loop()
    started = threading.Event()
    proceed = threading.Event()

    def parent() -> int:
        started.set()
        assert proceed.wait(30)
        stopped = anyfork.fork(checking)
        with pytest.raises(anyfork.CancelledError):
            stopped.wait(timeout=30)
        assert stopped.cancelled() and checking.steps == 0
        # Work that does not check is not stopped: a request is only ever seen, never
        # imposed (the parent too runs on, as it does not check).
        return anyfork.fork(lambda: 41).wait(timeout=30) + 1

    fut = anyfork.fork(parent)
    assert started.wait(30)
    assert fut.cancel() is False
    proceed.set()
    assert fut.wait(timeout=30) == 42


def test_a_stop_request_does_not_reach_the_fork_that_made_it() -> None:
    child_work = Loop()
    made: list[anyfork.Future[str]] = []

    def parent() -> str:
        made.append(anyfork.fork(child_work))
        try:
            made[0].wait(timeout=30)
        except anyfork.CancelledError:
            pass
        anyfork.check_cancelled()
        return "parent went on"

    fut = anyfork.fork(parent)
    child_work.steps_at(2)
    made[0].cancel()
    assert fut.wait(timeout=30) == "parent went on"
    assert made[0].cancelled()


# --- deadlines (another module asks through request_stop) ----------------------------------


def test_request_stop_asks_a_running_sync_fork_to_stop() -> None:
    work = Loop()
    fut = anyfork.fork(work)
    work.steps_at(2)
    _cancel.request_stop(fut)
    asked_at = work.steps
    with pytest.raises(anyfork.CancelledError):
        fut.wait(timeout=30)
    assert fut.cancelled()
    assert work.steps <= asked_at + 1


def test_a_running_fork_whose_future_was_completed_elsewhere_is_asked_to_stop() -> None:
    # A deadline completes the future with TimeoutError, then (or before) asks the work to
    # stop: either order works, and the late cancellation changes nothing.
    work = Loop()
    fut = anyfork.fork(work)
    work.steps_at(2)
    fut.set_exception(TimeoutError("past its deadline"))
    _cancel.request_stop(fut)  # after completion: harmless
    asked_at = work.steps
    deadline = time.monotonic() + 30
    while work.seen is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert work.steps <= asked_at + 1
    with pytest.raises(TimeoutError):
        fut.value()
    assert anyfork.pending() == []


def test_request_stop_is_harmless_on_futures_that_are_not_running_sync_forks() -> None:
    done = anyfork.fork(lambda: 1)
    assert done.wait() == 1
    plain: anyfork.Future[int] = anyfork.Future()
    for future in (done, plain):
        _cancel.request_stop(future)
    plain.set_result(2)
    assert (done.value(), plain.value()) == (1, 2)


# --- scripts: the exit join ---------------------------------------------------------------


@pytest.mark.parametrize("repeat", range(3))
def test_a_script_exits_promptly_after_its_forks_were_asked_to_stop(repeat: int) -> None:
    result = run_script(
        """
        import time, anyfork

        def step_forever(name):
            steps = 0
            while True:
                anyfork.check_cancelled()
                steps += 1
                time.sleep(0.005)

        def finishes():
            for _ in range(20):
                anyfork.check_cancelled()
                time.sleep(0.005)
            return "finished"

        stopped = [anyfork.fork(step_forever, i) for i in range(3)]
        done = anyfork.fork(finishes)
        time.sleep(0.05)
        print([f.cancel() for f in stopped])
        started = time.monotonic()
        # No wait: the exit join must wait for each fork once, and end with them.
        import atexit
        atexit.register(lambda: print(
            "exit join took", round(time.monotonic() - started, 2),
            [f.cancelled() for f in stopped], done.value(), anyfork.pending(), flush=True))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "[False, False, False]"
    took = float(lines[1].split()[3])
    assert lines[1].endswith("[True, True, True] finished []"), lines
    assert took < 10, lines


def test_cancelled_costs_little() -> None:
    # The figure for the notes comes from benchmarks; here only a generous bound, so a
    # slow check (a lock, a lookup in a shared table) shows.
    def measure() -> float:
        calls = 100_000
        started = time.perf_counter()
        for _ in range(calls):
            anyfork.cancelled()
        return (time.perf_counter() - started) / calls

    per_call = anyfork.fork(measure).wait(timeout=60)
    assert per_call < 5e-6, f"{per_call * 1e9:.0f} ns per call"


# --- what is not a sync fork's work ---------------------------------------------------------


def test_done_callbacks_of_a_sync_fork_are_not_its_work() -> None:
    # They run in the thread that completed the future (the worker), once the work is over:
    # neither a check there nor a fork made there is taken for the finished fork's.
    seen: list[bool] = []
    ran = threading.Event()
    proceed = threading.Event()
    fut = anyfork.fork(proceed.wait, 30)
    fut.add_done_callback(lambda _: seen.append(anyfork.cancelled()))
    then = fut.then(lambda _: anyfork.fork(ran.set))
    proceed.set()
    inner = then.wait(timeout=30)
    inner.wait(timeout=30)
    assert ran.is_set() and not inner.cancelled()
    assert seen == [False]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_process_forked_inside_a_sync_fork_is_not_in_that_fork() -> None:
    result = run_script(
        """
        import os, time, anyfork

        def work():
            while not anyfork.cancelled():  # asked to stop here, in the parent
                time.sleep(0.002)
            pid = os.fork()
            if pid == 0:  # the child: the parent's fork does not run here
                try:
                    seen = repr((anyfork.cancelled(), anyfork.check_cancelled()))
                except BaseException as exc:
                    seen = repr(exc)
                os.write(1, f"child: {seen}\\n".encode())
                os._exit(0)
            return os.waitpid(pid, 0)[1]

        fut = anyfork.fork(work)
        time.sleep(0.05)
        fut.cancel()
        print(fut.wait(timeout=30))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["child: (False, None)", "0"], result.stderr


def test_leaving_a_map_early_stops_its_running_sync_forks() -> None:
    works = [Loop() for _ in range(3)]

    def item(index: int) -> str:
        return "first" if index == 0 else works[index - 1]()

    for result in anyfork.map(item, range(4), limit=4):
        assert result == "first"
        for work in works:
            work.steps_at(2)
        break  # the forks in flight are cancelled: the running ones are asked to stop
    deadline = time.monotonic() + 30
    while not all(work.seen is not None for work in works):
        assert time.monotonic() < deadline, [work.steps for work in works]
        time.sleep(0.002)
    assert all(isinstance(work.seen, anyfork.CancelledError) for work in works)


@pytest.mark.parametrize("repeat", range(3))
def test_a_deadline_stops_a_running_sync_fork_that_checks(repeat: int) -> None:
    work = Loop()
    fut = anyfork.fork(anyfork.options(work, timeout=0.2))
    with pytest.raises(TimeoutError):
        fut.wait(timeout=30)
    deadline = time.monotonic() + 30
    while work.seen is None:
        assert time.monotonic() < deadline, work.steps
        time.sleep(0.002)
    assert isinstance(work.seen, anyfork.CancelledError)
    assert work.steps >= 1


# --- options-wrapped sync forks (anyfork.options) ------------------------------------------
# Their future's work is the options runner, not the job: a request must still reach the job.

OPTIONS: dict[str, dict[str, object]] = {
    "limit": {"limit": 1},
    "limit and retries": {"limit": 1, "retries": 2},
    "deadline": {"timeout": 60},
    "limit and deadline": {"limit": 2, "timeout": 60},
}


@pytest.mark.parametrize("options", OPTIONS)
def test_cancel_stops_a_running_options_wrapped_sync_fork(options: str) -> None:
    work = Loop()
    fut = anyfork.fork(anyfork.options(work, **OPTIONS[options]))  # type: ignore[arg-type]
    work.steps_at(3)
    assert fut.cancel() is False  # running: asked to stop
    asked_at = work.steps
    with pytest.raises(anyfork.CancelledError):
        fut.wait(timeout=30)
    assert fut.cancelled()
    assert isinstance(work.seen, anyfork.CancelledError)
    assert work.steps <= asked_at + 1


@pytest.mark.anyio
@pytest.mark.parametrize("options", OPTIONS)
async def test_a_scope_cancel_stops_its_running_options_wrapped_sync_forks(options: str) -> None:
    work = Loop()
    with anyio.fail_after(30):
        async with anyfork.scope() as scope:
            fut = anyfork.fork(anyfork.options(work, **OPTIONS[options]))  # type: ignore[arg-type]
            await steps_at(work, 2)
            scope.cancel()
            asked_at = work.steps
    assert fut.cancelled()
    assert isinstance(work.seen, anyfork.CancelledError)
    assert work.steps <= asked_at + 1


@pytest.mark.parametrize("options", ["limit", "limit and retries"])
def test_a_deadline_stops_a_running_limited_sync_fork_that_checks(options: str) -> None:
    work = Loop()
    limited = anyfork.options(work, timeout=0.2, **OPTIONS[options])  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        anyfork.fork(limited).wait(timeout=30)
    deadline = time.monotonic() + 30
    while work.seen is None:
        assert time.monotonic() < deadline, work.steps
        time.sleep(0.002)
    assert isinstance(work.seen, anyfork.CancelledError)
