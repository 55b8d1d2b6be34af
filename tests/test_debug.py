"""Seeing what forks are doing: anyfork.pending(), Scope.pending and debug mode."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import anyio
import pytest

import anyfork

from .conftest import garbage_collector_disabled, logged_within, run_in_thread, run_script

pytestmark = pytest.mark.anyio

THIS_FILE = __file__


def _ours(futures: list[anyfork.Future[Any]]) -> list[anyfork.PendingFork]:
    wanted = {id(future) for future in futures}
    return [record for record in anyfork.pending() if id(record.future) in wanted]


def test_pending_lists_queued_and_running_sync_forks_oldest_first() -> None:
    def script() -> None:
        anyfork.configure(worker_threads=1)
        started, release = threading.Event(), threading.Event()

        def blocker() -> None:
            started.set()
            release.wait(30)

        first = anyfork.fork(blocker)
        assert started.wait(30)
        second = anyfork.fork(abs, -1)  # queued behind it: one worker thread
        records = _ours([first, second])
        assert [(r.future, r.name, r.kind, r.state) for r in records] == [
            (
                first,
                "test_pending_lists_queued_and_running_sync_forks_oldest_first.<locals>"
                ".script.<locals>.blocker",
                "worker thread",
                "running",
            ),
            (second, "abs", "worker thread", "queued"),
        ]
        assert records[0].age >= records[1].age >= 0
        assert records[0].forked_at is None  # debug mode is off
        release.set()
        assert anyfork.wait_all([first, second], timeout=30) == [None, 1]
        assert _ours([first, second]) == []

    run_in_thread(script)


async def test_pending_lists_coroutine_forks_and_scopes_list_their_own() -> None:
    release = anyio.Event()
    both_started = anyio.Event()
    started = 0

    async def waits() -> str:
        nonlocal started
        started += 1
        if started == 2:
            both_started.set()
        await release.wait()
        return "done"

    try:
        with anyio.fail_after(30):
            outside = anyfork.fork(waits)
            async with anyfork.scope() as scope:
                inside = anyfork.fork(waits)
                await both_started.wait()
                records = _ours([outside, inside])
                assert {(r.future, r.kind, r.state) for r in records} == {
                    (outside, "task", "running"),
                    (inside, "task", "running"),
                }
                assert [r.future for r in scope.pending] == [inside]
                release.set()
            assert await outside == "done"
    finally:
        release.set()  # a failed assertion must not leave the scope waiting forever
    assert scope.pending == []
    assert _ours([outside, inside]) == []


async def test_pending_says_a_coroutine_fork_is_queued_until_its_task_starts() -> None:
    release = anyio.Event()
    try:
        future = anyfork.fork(release.wait)
        [record] = _ours([future])  # forked in this step: its task has not run yet
        assert (record.kind, record.state) == ("task", "queued")
    finally:
        release.set()
    with anyio.fail_after(30):
        await future


def test_debug_mode_records_where_each_fork_was_made() -> None:
    def script() -> None:
        anyfork.configure(debug=True)
        release = threading.Event()
        future = anyfork.fork(release.wait, 30)
        line = _line_of("future = anyfork.fork(release.wait, 30)")
        [record] = _ours([future])
        assert record.forked_at == f"{THIS_FILE}:{line} in script"
        assert f"forked at {THIS_FILE}:{line}" in repr(future)
        release.set()
        assert future.wait(30) is True
        anyfork.configure(debug=False)
        plain = anyfork.fork(abs, -2)
        assert "forked at" not in repr(plain)
        assert plain.wait(30) == 2

    run_in_thread(script)


def test_an_unretrieved_failure_is_logged_with_where_it_was_forked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail() -> None:
        raise ValueError("nobody reads this")

    def script() -> None:
        anyfork.configure(debug=True)
        future = anyfork.fork(fail)
        anyfork.wait_all([future.then(lambda f: None)], timeout=30)  # done, never read

    with caplog.at_level(logging.ERROR, logger="anyfork"), garbage_collector_disabled():
        run_in_thread(script)
        gc.collect()
    line = _line_of("future = anyfork.fork(fail)")
    assert logged_within(caplog, "never retrieved")
    [message] = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert f"forked at {THIS_FILE}:{line} in script" in message


def test_debug_mode_warns_once_about_a_fork_pending_too_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()

    def script() -> anyfork.Future[bool]:
        anyfork.configure(debug=True, slow_fork_warning=0.2)
        return anyfork.fork(release.wait, 30)

    with caplog.at_level(logging.WARNING, logger="anyfork"):
        future = run_in_thread(script)
        deadline = time.monotonic() + 20
        while not _slow_warnings(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the watchdog looks again every 50 ms: it must not warn again
        release.set()
        assert future.wait(30) is True
    [message] = _slow_warnings(caplog)
    line = _line_of("return anyfork.fork(release.wait, 30)")
    assert "has been pending for" in message
    assert f"forked at {THIS_FILE}:{line} in script" in message


def test_debug_mode_is_set_from_the_environment() -> None:
    result = run_script(
        """
import anyfork
print(anyfork.configure().debug, "forked at" in repr(anyfork.fork(abs, 1)))
""",
        env={"ANYFORK_DEBUG": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True True\n"
    bad = run_script("import anyfork", env={"ANYFORK_DEBUG": "maybe"})
    assert bad.returncode != 0
    assert "ANYFORK_DEBUG must be 0 or 1" in bad.stderr


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"debug": "yes"}, TypeError, "debug must be True or False"),
        ({"slow_fork_warning": 0}, ValueError, "slow_fork_warning must be a number"),
        ({"slow_fork_warning": float("nan")}, ValueError, "slow_fork_warning must be a number"),
    ],
)
def test_bad_debug_settings_are_refused_at_the_call(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    before = anyfork.configure()
    with pytest.raises(error, match=message):
        anyfork.configure(**arguments)
    assert anyfork.configure() == before


def _slow_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has been pending for" in r.getMessage()]


def _line_of(text: str) -> int:
    with open(THIS_FILE, encoding="utf-8") as source:
        for number, line in enumerate(source, start=1):
            if text in line:
                return number
    raise AssertionError(f"{text!r} is not in {THIS_FILE}")


# --- a scope whose exit waits too long says what for (issue 17, item b) ------------------


async def test_in_debug_mode_a_scope_whose_exit_waits_long_names_the_forks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The pattern that hangs: the body fails before it releases what a fork waits for, so
    # the scope's exit waits for that fork for ever. The log says which fork, and where.
    anyfork.configure(debug=True, slow_fork_warning=0.2)
    release = anyio.Event()

    async def waits_for_the_body() -> None:
        await release.wait()

    async def scope_whose_body_fails() -> None:
        async with anyfork.scope():
            anyfork.fork(waits_for_the_body)
            raise ValueError("the body failed before release.set()")

    with caplog.at_level(logging.WARNING, logger="anyfork"):
        async with anyio.create_task_group() as task_group:

            async def run_the_scope() -> None:
                with pytest.raises(ValueError, match="the body failed"):
                    await scope_whose_body_fails()

            task_group.start_soon(run_the_scope)
            with anyio.fail_after(20):
                while "a scope has been waiting" not in caplog.text:
                    await anyio.sleep(0.02)
            release.set()
    [message] = [
        r.getMessage() for r in caplog.records if "a scope has been waiting" in r.getMessage()
    ]
    assert "for 1 fork(s)" in message
    assert "waits_for_the_body" in message
    assert f"forked at {THIS_FILE}:" in message
