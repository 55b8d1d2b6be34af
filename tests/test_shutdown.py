"""Loop shutdown and interpreter exit, each in a fresh interpreter (python -X dev)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import run_script, without_slow_steps_under_the_bound

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "trio"])
def test_loop_shutdown_cancels_pending_ambient_forks_with_a_warning(runner: str) -> None:
    result = run_script(
        f"""
        import logging, anyio, anyfork
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
        import sys, time, anyio, anyfork

        def say(line):
            # One write per line: print() writes the text and the newline separately, so two
            # threads printing at once can interleave (seen on CI as "...threadnested from task").
            sys.stdout.write(line + "\\n")

        async def slow_async(label):
            await anyio.sleep(0.2)
            anyfork.fork(say, "nested from " + label)

        def slow_sync(label):
            time.sleep(0.2)
            anyfork.fork(say, "nested from " + label)

        anyfork.fork(slow_async, "task")
        anyfork.fork(slow_sync, "thread")
        print("main done")
        """
    )
    assert result.returncode == 0, result.stderr
    assert without_slow_steps_under_the_bound(result.stderr) == ""
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
        import anyfork, atexit, sys
        anyfork.fork(sys.stdout.write, "before exit\\n")

        def too_late():
            try:
                anyfork.fork(print, "never")
            except anyfork.ShutdownError as exc:
                sys.stdout.write(f"refused: {exc}\\n")

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


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("ANYFORK_WORKER_THREADS", "ANYFORK_WORKER_THREADS must be a whole number"),
        ("ANYFORK_EXIT_TIMEOUT", "ANYFORK_EXIT_TIMEOUT must be a number of seconds >= 0"),
        ("ANYFORK_EAGER", "ANYFORK_EAGER must be 0 or 1"),
    ],
)
def test_a_bad_environment_setting_fails_at_import_with_a_clear_message(
    variable: str, message: str
) -> None:
    result = run_script("import anyfork", env={variable: "many"})
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "trio"])
def test_a_sync_fork_still_running_when_the_loop_returns_is_joined_at_exit(runner: str) -> None:
    # A thread cannot be stopped: the fork finishes after its loop and is not lost.
    result = run_script(
        f"""
        import sys, time, anyio, anyfork

        def slow():
            time.sleep(0.5)
            sys.stdout.write("sync fork finished\\n")  # one write: no interleaving across threads
            sys.stdout.flush()

        async def main():
            anyfork.fork(slow)
            await anyio.sleep(0.05)

        anyio.run(main, backend={"trio" if runner == "trio" else "asyncio"!r},
                  backend_options={{"use_uvloop": True}} if {runner!r} == "uvloop" else {{}})
        sys.stdout.write("loop returned\\n")
        sys.stdout.flush()
        """
    )
    assert result.returncode == 0, result.stderr
    assert without_slow_steps_under_the_bound(result.stderr) == ""
    assert sorted(result.stdout.splitlines()) == ["loop returned", "sync fork finished"]


def test_a_fork_that_never_finishes_is_abandoned_after_the_exit_bound() -> None:
    started = time.monotonic()
    result = run_script(
        """
        import threading, anyio, anyfork

        async def forever():
            await anyio.sleep_forever()

        anyfork.fork(threading.Event().wait)
        anyfork.fork(forever)
        anyfork.fork(print, "finished work is still joined")
        """,
        env={"ANYFORK_EXIT_TIMEOUT": "1"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == "finished work is still joined\n"
    assert "2 fork(s) did not finish within the exit bound of 1.0 seconds" in result.stderr
    assert "<anyfork.Future 'Event.wait' running>" in result.stderr
    assert "<anyfork.Future 'forever' pending>" in result.stderr
    assert elapsed < 30, f"exit took {elapsed:.1f} s with a bound of 1 s"


# CTRL_C_RAISES: a process started in the background by a non-interactive shell inherits
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler. These scripts install
# it themselves, so the tests do not depend on how the test run was started.


@pytest.mark.parametrize("repeat", range(2))
def test_ctrl_c_during_the_exit_join_exits_promptly(repeat: int) -> None:
    source = """
        import signal, threading, anyio, anyfork
        from anyfork._exit import exit_join_started
        signal.signal(signal.SIGINT, signal.default_int_handler)  # see CTRL_C_RAISES

        def stuck():
            # Say when the exit join has begun, then never finish.
            exit_join_started.wait()
            print("exiting", flush=True)
            threading.Event().wait()

        async def forever():
            await anyio.sleep_forever()

        anyfork.fork(stuck)
        anyfork.fork(forever)
        print("main done", flush=True)
    """
    with subprocess.Popen(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ANYFORK_EXIT_TIMEOUT": "none"},
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "main done\n"
        assert process.stdout.readline() == "exiting\n"
        interrupts = 0
        while interrupts < 2:
            process.send_signal(signal.SIGINT)
            interrupts += 1
            try:
                process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            process.kill()
            pytest.fail("the process did not exit after two Ctrl-C")
        stderr = process.stderr.read() if process.stderr else ""
    # The bound: exit promptly after a second Ctrl-C at most. One press is enough since
    # the main thread's waits wake up to let it through (the tests below pin the cause down).
    assert "fork(s) were interrupted at exit (Ctrl-C)" in stderr, stderr


# A SIGINT sent to the process may have its C-level handler run in any thread. When a worker
# thread takes it, the main thread's lock wait is not interrupted: before the fix, the
# KeyboardInterrupt waited for the exit bound (forever by default), and one Ctrl-C in about 12
# on a loaded machine was lost this way. pthread_kill makes a worker take it every time.
SIGINT_IN_A_WORKER = """
import signal, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # see CTRL_C_RAISES

def ctrl_c_taken_by_this_thread():
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
"""


@pytest.mark.parametrize("repeat", range(2))
def test_a_ctrl_c_taken_by_a_worker_thread_still_ends_the_exit_join(repeat: int) -> None:
    started = time.monotonic()
    result = run_script(
        SIGINT_IN_A_WORKER
        + textwrap.dedent(
            """
        import anyfork
        from anyfork._exit import exit_join_started

        running = threading.Event()

        def stuck():
            running.set()
            exit_join_started.wait()
            ctrl_c_taken_by_this_thread()
            threading.Event().wait()

        anyfork.fork(stuck)
        # A worker thread runs it: without this, the exit join (with no bound) could find
        # it not yet started on a loaded machine and run it in the main thread itself.
        running.wait()
        """
        ),
        env={"ANYFORK_EXIT_TIMEOUT": "none"},
    )
    elapsed = time.monotonic() - started
    assert "1 fork(s) were interrupted at exit (Ctrl-C)" in result.stderr, result.stderr
    assert elapsed < 30, f"the Ctrl-C took {elapsed:.1f} s to end the exit join"


def test_a_ctrl_c_in_a_fork_the_exit_join_runs_itself_names_that_fork() -> None:
    # With no exit bound, the join runs the sync forks no worker has started in the main
    # thread, where a Ctrl-C interrupts the fork itself. That fork was left out: the join
    # said "0 fork(s) were interrupted" (or named only the others), and then reported the
    # fork's KeyboardInterrupt as an error nobody retrieved. Seen as a flake of the test
    # above on loaded free-threaded runs, when the worker had not started its fork yet.
    result = run_script(
        SIGINT_IN_A_WORKER
        + textwrap.dedent(
            """
        import anyfork
        from anyfork._exit import exit_join_started

        anyfork.configure(worker_threads=1)
        running = threading.Event()

        def occupying_the_worker():
            running.set()
            threading.Event().wait()

        def run_by_the_exit_join():
            assert threading.current_thread() is threading.main_thread()
            assert exit_join_started.is_set()
            ctrl_c_taken_by_this_thread()

        anyfork.fork(occupying_the_worker)
        running.wait()
        anyfork.fork(run_by_the_exit_join)  # queued: the one worker thread is taken
        """
        ),
        env={"ANYFORK_EXIT_TIMEOUT": "none"},
    )
    assert "2 fork(s) were interrupted at exit (Ctrl-C)" in result.stderr, result.stderr
    assert "'run_by_the_exit_join'" in result.stderr, result.stderr
    assert "'occupying_the_worker'" in result.stderr, result.stderr
    assert "never retrieved" not in result.stderr, result.stderr


def test_a_ctrl_c_taken_by_a_worker_thread_interrupts_a_wait_in_the_main_thread() -> None:
    result = run_script(
        SIGINT_IN_A_WORKER
        + textwrap.dedent(
            """
        import time, anyfork
        started, go, release = threading.Event(), threading.Event(), threading.Event()

        def stuck():
            started.set()
            go.wait()
            ctrl_c_taken_by_this_thread()
            release.wait()

        fut = anyfork.fork(stuck)
        started.wait()  # running in a worker: the wait below cannot run it itself
        began = time.monotonic()
        try:
            go.set()
            anyfork.wait(fut)
        except KeyboardInterrupt:
            print(f"interrupted after {time.monotonic() - began:.1f} s")
        release.set()
        """
        ),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("interrupted after"), result.stdout
    assert float(result.stdout.split()[2]) < 30, result.stdout


RUN_THAT_FORKS_AND_RETURNS_AT_ONCE = """
    import logging, sys, anyio, anyfork
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    async def slow_work():
        await anyio.sleep(1)
        sys.stdout.write("slow_work ran\\n")

    def sync_work():
        sys.stdout.write("sync_work ran\\n")

    async def main():
        anyfork.fork(slow_work)
        anyfork.fork(sync_work)
"""


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "trio"])
def test_a_run_that_forks_and_returns_at_once_reports_only_anyforks_warnings(runner: str) -> None:
    result = run_script(
        RUN_THAT_FORKS_AND_RETURNS_AT_ONCE
        + f"""
    anyio.run(main, backend={"trio" if runner == "trio" else "asyncio"!r},
              backend_options={{"use_uvloop": True}} if {runner!r} == "uvloop" else {{}})
    """
    )
    assert result.returncode == 0, result.stderr
    stderr = without_slow_steps_under_the_bound(result.stderr)
    # Each fork either ran or is reported by name; nothing else is printed.
    for name in ("slow_work", "sync_work"):
        assert f"{name} ran" in result.stdout or f"fork <anyfork.Future '{name}'" in stderr
    assert "fork <anyfork.Future 'slow_work'" in stderr
    lines = stderr.splitlines()
    assert lines and all(
        line.startswith("WARNING anyfork: fork <anyfork.Future") for line in lines
    ), stderr


def test_forks_lost_by_a_loop_that_stopped_without_cancelling_its_tasks_are_reported() -> None:
    # nest_asyncio's asyncio.run neither cancels the loop's remaining tasks nor closes it:
    # the forks would never run, and nothing else would say so.
    result = run_script(
        RUN_THAT_FORKS_AND_RETURNS_AT_ONCE
        + """
    import asyncio, nest_asyncio
    nest_asyncio.apply()
    asyncio.run(main())
    """
    )
    assert result.returncode == 0, result.stderr
    stderr = without_slow_steps_under_the_bound(result.stderr)
    assert "slow_work ran" not in result.stdout
    assert (
        "WARNING anyfork: fork <anyfork.Future 'slow_work' cancelled> was cancelled because "
        "its event loop stopped with the fork unfinished" in stderr
    )
    assert "sync_work ran" in result.stdout or "<anyfork.Future 'sync_work'" in stderr
    for noise in ("was never awaited", "Task was destroyed", "Traceback"):
        assert noise not in stderr


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "trio"])
def test_a_sync_fork_that_outlives_its_loop_can_still_fork_and_wait(runner: str) -> None:
    # Its forks run as from a thread with no loop (sync: the worker pool, coroutine: the
    # background loop) instead of being cancelled with its dead loop; its result is kept.
    result = run_script(
        f"""
        import sys, time, anyio, anyfork

        def double(x):
            return 2 * x

        async def add_one(x):
            await anyio.sleep(0.01)
            return x + 1

        def outlives_its_loop():
            time.sleep(0.3)  # the run has returned by now
            return anyfork.wait(anyfork.fork(double, 20)) + anyfork.wait(anyfork.fork(add_one, 1))

        futures = []

        async def main():
            futures.append(anyfork.fork(outlives_its_loop))
            await anyio.sleep(0.01)

        runner = {runner!r}
        if runner == "asyncio":
            import asyncio
            asyncio.run(main())
        elif runner == "uvloop":
            import uvloop
            uvloop.run(main())
        else:
            import trio
            trio.run(main)
        sys.stdout.write("run returned\\n")
        futures[0].add_done_callback(lambda f: sys.stdout.write(f"result: {{f.value()}}\\n"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert without_slow_steps_under_the_bound(result.stderr) == ""
    assert result.stdout.splitlines()[-1] == "result: 42"


def test_a_worker_that_finds_its_fork_run_by_a_waiter_leaves_it_to_the_exit_join() -> None:
    # A worker takes the queued job while a waiter in another thread runs the same fork
    # inline: the worker's claim fails because the fork is running, not because it is
    # over, so the exit join must still wait for it. The worker is held between taking
    # the job and claiming it, the moment two threads race for a job.
    result = run_script(
        """
        import threading, time, anyfork
        from anyfork import _sync_job

        worker_in_claim = threading.Event()
        waiter_runs_it = threading.Event()
        worker_lost = threading.Event()
        real_claim = _sync_job.claim

        def claim(future):
            if not threading.current_thread().name.startswith("anyfork-worker"):
                return real_claim(future)
            worker_in_claim.set()
            waiter_runs_it.wait(10)
            claimed = real_claim(future)
            if not claimed:
                worker_lost.set()
            return claimed

        _sync_job.claim = claim

        def work():
            waiter_runs_it.set()
            worker_lost.wait(10)
            time.sleep(0.5)  # still running when the script ends
            print("finished", flush=True)

        fut = anyfork.fork(work)
        worker_in_claim.wait(10)
        threading.Thread(target=fut.wait, daemon=True).start()
        print("worker lost the race:", worker_lost.wait(10), flush=True)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "worker lost the race: True\nfinished\n"


# What a non-daemon thread runs once the main thread has returned: forks, waits, and one
# fork nobody waits for, which the exit join must still join (its callback prints).
_AFTER_MAIN_RETURNED = """
import asyncio, concurrent.futures, sys, threading, time, anyfork

def after_main_returned():
    # Python's exit has begun (threading._shutdown), waiting for this thread to end.
    while not threading._SHUTTING_DOWN:
        time.sleep(0.01)

async def double(x):
    return 2 * x

def forks():
    after_main_returned()
    print("sync", anyfork.fork(abs, -3).wait(timeout=20), flush=True)
    print("coroutine", anyfork.fork(double, 2).wait(timeout=20), flush=True)
    anyfork.fork(time.sleep, 0.3).add_done_callback(
        lambda f: sys.stdout.write("joined\\n")
    )

async def service():
    while not threading._SHUTTING_DOWN:
        await asyncio.sleep(0.01)
    print("sync", await anyfork.fork(abs, -3), flush=True)
    print("coroutine", await anyfork.fork(double, 2), flush=True)
    # Short: on Python 3.12, with no worker thread yet, it runs on this loop's thread.
    anyfork.fork(time.sleep, 0.05).add_done_callback(
        lambda f: sys.stdout.write("joined\\n")
    )
"""


@pytest.mark.parametrize("forked_before", [False, True], ids=["first-fork-late", "forked-before"])
@pytest.mark.parametrize("thread", ["thread", "executor", "asyncio"])
def test_non_daemon_threads_still_fork_after_the_main_thread_returns(
    thread: str, forked_before: bool
) -> None:
    # Python keeps a program working until its non-daemon threads end: so does anyfork,
    # and the exit join then joins what they forked.
    start = {
        "thread": "threading.Thread(target=forks).start()",
        "executor": "concurrent.futures.ThreadPoolExecutor(1).submit(forks)",
        "asyncio": "threading.Thread(target=asyncio.run, args=(service(),)).start()",
    }[thread]
    before = "print(anyfork.fork(abs, -1).wait(timeout=20))\n" if forked_before else ""
    result = run_script(_AFTER_MAIN_RETURNED + before + start + "\n")
    assert result.returncode == 0, result.stderr
    expected = "sync 3\ncoroutine 4\njoined\n"
    assert result.stdout == ("1\n" if forked_before else "") + expected, result.stderr
    assert result.stderr == ""
