"""Process forks (anyfork.process): round trips, cancel that kills, dying workers, exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import anyfork
from anyfork._process_pool import RemoteTraceback, pool
from anyfork._state import settle_failed

from . import process_tasks as tasks

try:  # imported here, not on a loop's thread (its import reads files)
    import fastapi

    import anyfork.fastapi
except ImportError:  # not installed on free-threaded Python
    fastapi = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /proc")


@pytest.fixture(scope="module", autouse=True)
def _no_orphan_worker_processes() -> Iterator[None]:
    """One pool serves the whole module; at its end, stopping it leaves no process behind."""
    yield
    pids = pool.worker_pids()
    pool.stop(10)
    for pid in pids:
        tasks.wait_gone(pid, 10)


async def _pid_written(pid_file: Path) -> int:
    return await anyio.to_thread.run_sync(tasks.wait_for_pid, pid_file)


async def _gone_within(pid: int, seconds: float) -> float:
    """Seconds until ``pid`` has ended (killed); then waits, generously, for the pool to
    reap it. The bound is asserted by the caller, with the figure; this fails only far
    beyond it."""
    took = await anyio.to_thread.run_sync(tasks.wait_dead, pid, seconds + 10)
    await anyio.to_thread.run_sync(tasks.wait_gone, pid, 30)
    return took


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_process_fork_returns_its_value_from_another_process() -> None:
    assert await anyfork.fork(tasks.square, 7) == 49
    assert await anyfork.fork(tasks.pid) != os.getpid()


@pytest.mark.anyio
async def test_a_process_fork_raises_its_own_error_with_the_worker_traceback() -> None:
    with pytest.raises(tasks.TaskError, match="no luck") as caught:
        await anyfork.fork(tasks.fail, "no luck")
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail" in cause.text and "raise TaskError(message)" in cause.text


def test_calling_a_process_function_runs_it_here() -> None:
    assert tasks.pid() == os.getpid()
    assert tasks.pid.func() == os.getpid()
    assert repr(tasks.square) == "<anyfork.process 'square'>"


def test_a_closure_goes_to_the_worker_by_value() -> None:
    offset = 10

    @anyfork.process
    def add(x: int) -> int:
        return x + offset

    assert anyfork.fork(add, 5).wait(timeout=60) == 15
    assert anyfork.fork(anyfork.process()(lambda: offset * 2)).wait(timeout=60) == 20


def test_an_argument_that_cannot_be_pickled_fails_at_fork() -> None:
    import threading

    with pytest.raises(TypeError, match="cannot send the arguments of square"):
        anyfork.fork(tasks.square, threading.Lock())  # type: ignore[arg-type]


def test_a_result_that_cannot_be_pickled_fails_its_fork_with_type_error() -> None:
    with pytest.raises(TypeError, match="cannot be pickled to go back"):
        anyfork.fork(tasks.lock_result).wait(timeout=60)


def test_a_coroutine_function_cannot_be_a_process_function() -> None:
    async def fetch() -> None:
        pass

    with pytest.raises(TypeError, match="coroutine function"):
        anyfork.process(fetch)


def test_a_partial_of_a_process_function_runs_in_a_worker() -> None:
    import functools

    assert anyfork.fork(functools.partial(tasks.square, 9)).wait(timeout=60) == 81


def test_without_cloudpickle_marking_a_process_function_says_what_to_install() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['cloudpickle'] = None\nimport anyfork\nanyfork.process(len)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ImportError" in result.stderr
    assert 'pip install "anyfork[process]"' in result.stderr


def test_changing_another_setting_keeps_idle_worker_processes() -> None:
    worker = anyfork.fork(tasks.pid).wait(timeout=60)
    anyfork.configure(slow_fork_warning=5.0)
    time.sleep(0.2)
    assert worker in pool.worker_pids()


@pytest.mark.parametrize(
    ("value", "printed"),
    [("3", "3"), ("0", "ANYFORK_PROCESS_WORKERS must be a whole number >= 1, got '0'")],
)
def test_process_workers_can_be_set_by_the_environment(value: str, printed: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import anyfork; print(anyfork.configure().process_workers)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ANYFORK_PROCESS_WORKERS": value},
    )
    assert printed in result.stdout + result.stderr


def test_process_workers_is_validated() -> None:
    with pytest.raises(TypeError, match="process_workers"):
        anyfork.configure(process_workers="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="process_workers"):
        anyfork.configure(process_workers=0)


@pytest.mark.anyio
async def test_a_fan_out_of_process_forks_completes_through_as_completed() -> None:
    futures = [anyfork.fork(tasks.square, n) for n in range(20)]
    seen = sorted([await future async for future in anyfork.as_completed(futures)])
    assert seen == sorted(n * n for n in range(20))
    assert anyfork.wait_all(futures) == [n * n for n in range(20)]


@pytest.mark.anyio
async def test_anyfork_map_runs_a_process_function_in_worker_processes() -> None:
    assert [n async for n in anyfork.map(tasks.square, range(6), limit=2)] == [
        n * n for n in range(6)
    ]


def test_a_process_fork_can_fork_a_thread_fork_in_its_worker() -> None:
    worker, in_another_thread = anyfork.fork(tasks.fork_a_thread).wait(timeout=60)
    assert worker != os.getpid() and in_another_thread


def test_an_idle_worker_process_retires(tmp_path: Path) -> None:
    anyfork.configure(process_workers=1)
    pool.stop(10)  # start from no worker
    anyfork.configure(worker_idle_timeout=0.2)
    try:
        worker = anyfork.fork(tasks.pid).wait(timeout=60)
        tasks.wait_gone(worker, 30)
        assert pool.worker_pids() == []
        assert anyfork.fork(tasks.square, 2).wait(timeout=60) == 4  # and it starts again
    finally:
        anyfork.configure(worker_idle_timeout=10.0, process_workers=None)


# --- cancel and deadlines stop the work ------------------------------------------------------


@pytest.mark.anyio
async def test_cancelling_a_scope_kills_its_running_process_fork_and_the_pool_keeps_serving(
    tmp_path: Path,
) -> None:
    async with anyfork.scope() as scope:
        future = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
        worker = await _pid_written(tmp_path / "pid")
        assert [(p.kind, p.state) for p in scope.pending] == [("process", "running")]
        scope.cancel()
    assert await _gone_within(worker, 0.5) < 0.5
    with pytest.raises(anyfork.CancelledError):
        await future
    assert await anyfork.fork(tasks.square, 3) == 9


@pytest.mark.anyio
async def test_cancelling_a_process_fork_made_outside_any_scope_kills_its_worker(
    tmp_path: Path,
) -> None:
    future = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
    worker = await _pid_written(tmp_path / "pid")
    assert [(p.kind, p.state) for p in anyfork.pending() if p.future is future] == [
        ("process", "running")
    ]
    assert future.cancel()
    assert await _gone_within(worker, 0.5) < 0.5
    with pytest.raises(anyfork.CancelledError):
        await future
    assert await anyfork.fork(tasks.square, 3) == 9


@pytest.mark.anyio
async def test_a_cancelled_scope_kills_its_running_process_forks(tmp_path: Path) -> None:
    with anyio.move_on_after(60) as outer:  # an enclosing cancel scope
        async with anyfork.scope():
            future = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
            worker = await _pid_written(tmp_path / "pid")
            outer.cancel()
    assert future.cancelled()
    assert await _gone_within(worker, 0.5) < 0.5
    assert await anyfork.fork(tasks.square, 4) == 16


@pytest.mark.anyio
async def test_a_deadline_that_settles_a_process_fork_kills_its_worker(tmp_path: Path) -> None:
    # What a deadline does (anyfork.options(timeout=)): it fails the future with TimeoutError.
    future = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
    worker = await _pid_written(tmp_path / "pid")
    settle_failed(future, TimeoutError("deadline"))
    assert await _gone_within(worker, 0.5) < 0.5
    with pytest.raises(TimeoutError):
        await future
    assert await anyfork.fork(tasks.square, 5) == 25


def test_a_cancelled_queued_process_fork_never_starts(tmp_path: Path) -> None:
    anyfork.configure(process_workers=1)
    try:
        busy = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
        tasks.wait_for_pid(tmp_path / "pid")
        queued = anyfork.fork(tasks.touch, str(tmp_path / "ran"))
        assert [p.state for p in anyfork.pending() if p.future is queued] == ["queued"]
        assert queued.cancel() and busy.cancel()
        assert anyfork.fork(tasks.square, 6).wait(timeout=60) == 36
        assert not (tmp_path / "ran").exists()
    finally:
        anyfork.configure(process_workers=None)


# --- workers that die -----------------------------------------------------------------------


def test_a_worker_that_exits_fails_only_its_fork(tmp_path: Path) -> None:
    sibling = anyfork.fork(tasks.touch, str(tmp_path / "sibling"), 0.5)
    dying = anyfork.fork(tasks.exit_now, 3)
    with pytest.raises(anyfork.ProcessDiedError, match="exited with code 3") as caught:
        dying.wait(timeout=60)
    assert caught.value.exitcode == 3
    assert sibling.wait(timeout=60) == str(tmp_path / "sibling")
    assert anyfork.wait_all([anyfork.fork(tasks.square, n) for n in range(4)]) == [0, 1, 4, 9]


@pytest.mark.anyio
async def test_a_worker_killed_by_hand_fails_only_its_fork(tmp_path: Path) -> None:
    future = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
    os.kill(await _pid_written(tmp_path / "pid"), signal.SIGKILL)
    with pytest.raises(anyfork.ProcessDiedError, match=r"killed by SIGKILL \(9\)") as caught:
        await future
    assert caught.value.exitcode == -signal.SIGKILL
    assert await anyfork.fork(tasks.square, 8) == 64


def test_a_worker_that_dies_while_idle_is_replaced_without_failing_a_fork() -> None:
    anyfork.configure(process_workers=1)
    try:
        worker = anyfork.fork(tasks.pid).wait(timeout=60)
        os.kill(worker, signal.SIGKILL)
        tasks.wait_gone(worker, 30)  # reaped: the pool has seen it die
        assert anyfork.fork(tasks.pid).wait(timeout=60) not in (worker, os.getpid())
    finally:
        anyfork.configure(process_workers=None)


@pytest.mark.timeout(300)  # a worker imports torch: seconds, minutes on a loaded machine
def test_torch_grad_mode_travels_to_the_worker() -> None:
    torch = pytest.importorskip("torch")
    anyfork.configure(process_workers=1)  # one worker imports torch (seconds), not each
    try:
        with torch.no_grad():
            assert anyfork.fork(tasks.grad_enabled).wait(timeout=120) == (False, False)
        with torch.inference_mode():
            assert anyfork.fork(tasks.grad_enabled).wait(timeout=120) == (False, True)
        assert anyfork.fork(tasks.grad_enabled).wait(timeout=120) == (True, False)
    finally:
        anyfork.configure(process_workers=None)


# --- scripts: __main__, the exit join, Ctrl-C, os.fork -----------------------------------------


def _script(tmp_path: Path, source: str) -> tuple[list[str], dict[str, str]]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    env["ANYFORK_TEST_MARK"] = mark = uuid.uuid4().hex
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env["MARK"] = mark
    return [sys.executable, "-X", "dev", str(script)], env


def _processes_marked(mark: str, timeout: float = 10) -> list[int]:
    """The processes (by pid, from /proc) whose environment carries ``mark``: the script's
    worker processes inherit it. Waits up to ``timeout`` for them to end."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"ANYFORK_TEST_MARK={mark}".encode() in environ:
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _run(tmp_path: Path, source: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command, env = _script(tmp_path, source)
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )
    assert _processes_marked(env["MARK"]) == [], "a worker process outlived its script"
    return result


def test_a_script_forks_its_own_functions_and_closures_without_a_main_guard(
    tmp_path: Path,
) -> None:
    result = _run(
        tmp_path,
        """
        import os
        import anyfork

        class Shape:
            def __init__(self, sides):
                self.sides = sides

        @anyfork.process
        def make(sides):
            return Shape(sides), os.getpid()

        def adder(k):
            return anyfork.process(lambda x: x + k)

        print("top level ran in", "worker" if os.environ.get("IN_WORKER") else "script")
        os.environ["IN_WORKER"] = "1"  # a worker that re-ran this script would say so
        shape, worker = anyfork.fork(make, 5).wait()
        print(type(shape) is Shape, shape.sides, worker != os.getpid())
        print(anyfork.fork(adder(2), 40).wait())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["top level ran in script", "True 5 True", "42"]


def test_the_exit_join_runs_queued_process_forks(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        """
        import anyfork
        from tests import process_tasks as tasks

        anyfork.configure(process_workers=1)
        for name in "abc":
            anyfork.fork(tasks.touch, name, 0.2)  # never waited for
        print("forked")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if len(p.name) == 1) == ["a", "b", "c"]


def test_the_exit_bound_kills_a_process_fork_that_runs_on(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(
        tmp_path,
        """
        import anyfork
        from tests import process_tasks as tasks

        anyfork.configure(exit_timeout=1)
        anyfork.fork(tasks.spin, "pid")
        tasks.wait_for_pid(__import__("pathlib").Path("pid"))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "did not finish within the exit bound" in result.stderr
    assert time.monotonic() - started < 60


def test_ctrl_c_during_a_process_fan_out_leaves_no_child_process(tmp_path: Path) -> None:
    command, env = _script(
        tmp_path,
        """
        import signal
        import anyfork
        from pathlib import Path
        from tests import process_tasks as tasks

        # A shell's background job starts with SIGINT ignored, and Python keeps it so.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        anyfork.configure(process_workers=2, exit_timeout=1)
        futures = [anyfork.fork(tasks.spin, f"pid{n}") for n in range(6)]
        tasks.wait_for_pid(Path("pid0")), tasks.wait_for_pid(Path("pid1"))
        print("running", flush=True)
        anyfork.wait_all(futures)
        """,
    )
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as script:
        assert script.stdout is not None
        assert script.stdout.readline() == "running\n"
        script.send_signal(signal.SIGINT)
        try:
            _, stderr = script.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            script.kill()
            raise
    assert "KeyboardInterrupt" in stderr
    assert _processes_marked(env["MARK"]) == [], "a worker process outlived its script"


def test_a_worker_process_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    command, env = _script(
        tmp_path,
        """
        import anyfork
        from pathlib import Path
        from tests import process_tasks as tasks

        future = anyfork.fork(tasks.spin, "pid")
        tasks.wait_for_pid(Path("pid"))
        print("running", flush=True)
        future.wait()
        """,
    )
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as script:
        assert script.stdout is not None
        assert script.stdout.readline() == "running\n"
        script.kill()  # SIGKILL: no exit join, no cleanup of any kind
    worker = int((tmp_path / "pid").read_text())
    assert tasks.wait_gone(worker, 30) < 30


def test_process_forks_work_in_an_os_fork_child_and_leave_no_process(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        """
        import os
        import anyfork
        from tests import process_tasks as tasks

        print(anyfork.fork(tasks.square, 3).wait())
        child = os.fork()
        if child == 0:
            print(anyfork.fork(tasks.square, 4).wait(), flush=True)
            os._exit(0)  # a child made by os.fork ends without the exit join
        os.waitpid(child, 0)
        print(anyfork.fork(tasks.square, 5).wait())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["9", "16", "25"]


# --- FastAPI: a request whose client left --------------------------------------------------


@pytest.mark.anyio
async def test_a_client_that_leaves_kills_its_requests_running_process_fork(
    tmp_path: Path,
) -> None:
    if fastapi is None:
        pytest.skip("fastapi is not installed")
    app = fastapi.FastAPI()
    app.add_middleware(
        anyfork.fastapi.ForkScopeMiddleware, policy="cancel", cancel_on_disconnect=True
    )
    outcome: dict[str, object] = {}
    forked = anyio.Event()

    @app.get("/spin")
    async def spin() -> str:
        future = anyfork.fork(tasks.spin, str(tmp_path / "pid"))
        outcome["worker"] = await _pid_written(tmp_path / "pid")
        forked.set()
        try:
            await future
        except anyfork.CancelledError:
            outcome["fork"] = "cancelled"
        return "done"

    disconnect = anyio.Event()
    messages: list[dict[str, object]] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/spin",
        "raw_path": b"/spin",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("test", 1234),
    }
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await forked.wait()
            disconnect.set()
    assert outcome["fork"] == "cancelled"
    worker = outcome["worker"]
    assert isinstance(worker, int)
    assert await _gone_within(worker, 0.5) < 0.5
