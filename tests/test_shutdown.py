"""Loop shutdown and interpreter exit, each in a fresh interpreter (python -X dev)."""

from __future__ import annotations

import pytest

from .conftest import run_script

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "trio"])
def test_loop_shutdown_cancels_pending_ambient_forks_with_a_warning(runner: str) -> None:
    result = run_script(
        f"""
        import logging, anyio, anyfork
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        futures = []

        async def never_finishes():
            await anyio.sleep_forever()

        def late_sync():
            return 1

        async def main():
            futures.append(anyfork.fork(never_finishes))
            await anyio.sleep(0.01)

        runner = {runner!r}
        if runner == "asyncio":
            import asyncio
            asyncio.run(main(), debug=True)
        elif runner == "uvloop":
            import uvloop
            uvloop.run(main())
        else:
            import trio
            trio.run(main)
        print("cancelled:", futures[0].cancelled())
        """
    )
    assert result.returncode == 0, result.stderr
    assert "cancelled: True" in result.stdout
    assert "WARNING anyfork: fork <anyfork.Future 'never_finishes'" in result.stderr
    assert "event loop shut down" in result.stderr
    for noise in ("was never awaited", "Task was destroyed", "Traceback"):
        assert noise not in result.stderr


@pytest.mark.parametrize("repeat", range(3))
def test_a_script_joins_unfinished_forks_at_exit(repeat: int) -> None:
    # On Python 3.12+ no thread can start during the exit join: the sync fork made by the
    # task must still run (stolen by the join), not fail.
    result = run_script(
        """
        import time, anyio, anyfork

        async def slow_async(label):
            await anyio.sleep(0.2)
            anyfork.fork(print, "nested from", label)

        def slow_sync(label):
            time.sleep(0.2)
            anyfork.fork(print, "nested from", label)

        anyfork.fork(slow_async, "task")
        anyfork.fork(slow_sync, "thread")
        print("main done")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "main done"
    assert sorted(lines[1:]) == ["nested from task", "nested from thread"]


def test_an_unretrieved_failure_in_a_script_is_logged_not_lost() -> None:
    result = run_script(
        """
        import anyfork
        anyfork.fork(lambda: 1 / 0)
        """
    )
    assert result.returncode == 0
    assert "never retrieved" in result.stderr
    assert "ZeroDivisionError" in result.stderr


def test_sync_forks_in_a_script_run_concurrently() -> None:
    result = run_script(
        """
        import threading, anyfork
        barrier = threading.Barrier(4, timeout=10)
        futs = [anyfork.fork(barrier.wait) for _ in range(4)]
        print(sorted(anyfork.wait_all(futs)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1, 2, 3]"


def test_forking_after_shutdown_raises_a_clear_error() -> None:
    result = run_script(
        """
        import anyfork, atexit
        anyfork.fork(print, "before exit")

        def too_late():
            try:
                anyfork.fork(print, "never")
            except anyfork.ShutdownError as exc:
                print("refused:", exc)

        atexit.register(too_late)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "before exit" in result.stdout
    assert "refused: anyfork cannot start new work" in result.stdout


def test_eager_mode_from_the_environment_runs_forks_in_the_caller() -> None:
    result = run_script(
        """
        import threading, anyfork
        main = threading.get_ident()

        async def coro():
            return threading.get_ident() == main

        fut = anyfork.fork(threading.get_ident)
        print(fut.done(), fut.value() == main, anyfork.fork(coro).value())
        """,
        env={"ANYFORK_EAGER": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True True True"


def test_a_bad_environment_setting_fails_at_import_with_a_clear_message() -> None:
    result = run_script("import anyfork", env={"ANYFORK_WORKER_THREADS": "many"})
    assert result.returncode != 0
    assert "ANYFORK_WORKER_THREADS must be a whole number" in result.stderr
