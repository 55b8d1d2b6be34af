"""anyfork.ray: remote forks onto an embedded local Ray (2 CPUs, no dashboard).

One Ray for the whole module (it takes seconds to start on a busy machine): the tests that
need a fresh interpreter (exit, scripts) start one each, and are few.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

ray = pytest.importorskip("ray")

import anyfork  # noqa: E402
import anyfork.ray  # noqa: E402
from anyfork.ray import RemoteImportError, remote  # noqa: E402

from . import ray_tasks as tasks  # noqa: E402
from .conftest import run_script  # noqa: E402

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One embedded local Ray for this module, started (and shut down) by anyfork."""
    os.environ.pop("RAY_ADDRESS", None)
    address = anyfork.ray.connect(num_cpus=2).wait(180)
    try:
        yield address
    finally:
        anyfork.ray.close()


@pytest.fixture
def cluster(ray_cluster: str) -> str:
    return ray_cluster


# --- remote() itself ---------------------------------------------------------------------


def test_calling_a_remote_function_runs_it_here() -> None:
    assert tasks.add(1, 2) == 3
    assert tasks.add.__name__ == "add"
    assert tasks.add.__wrapped__(2, 2) == 4


def test_a_fork_runs_at_most_once_unless_asked() -> None:
    @remote(num_cpus=0.5, max_retries=2, retry_exceptions=True)
    def with_options() -> int:
        return 1

    assert with_options.options == {"num_cpus": 0.5, "max_retries": 2, "retry_exceptions": True}
    assert tasks.add.options == {"max_retries": 0}  # Ray's own default is 3
    assert anyfork.ray.DEFAULT_MAX_RETRIES == 0


def test_remote_rejects_a_coroutine_function_saying_why() -> None:
    async def fetch() -> int:
        return 1

    with pytest.raises(TypeError, match=r"sync callables only.*no event loop"):
        remote(fetch)


def test_remote_rejects_unknown_options_and_wrong_types() -> None:
    with pytest.raises(TypeError, match="gpus"):
        remote(gpus=1)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="max_retries="):
        remote(max_retries="3")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="num_cpus="):
        remote(num_cpus=True)


def test_a_remote_function_pickles_by_name() -> None:
    import pickle

    assert pickle.loads(pickle.dumps(tasks.add)) is tasks.add


def test_importing_anyfork_does_not_import_ray() -> None:
    result = run_script(
        """
        import sys
        import anyfork
        anyfork.wait(anyfork.fork(len, "abc"))
        assert "ray" not in sys.modules, "anyfork imported ray"
        """
    )
    assert result.returncode == 0, result.stderr


def test_eager_mode_runs_a_remote_fork_here() -> None:
    anyfork.configure(eager=True)
    future = anyfork.fork(tasks.pid)
    assert future.done()
    assert future.value() == os.getpid()


# --- values and errors ---------------------------------------------------------------------


def test_a_remote_fork_runs_in_a_worker_process_and_returns_its_value(cluster: str) -> None:
    assert anyfork.wait(anyfork.fork(tasks.add, 2, 3), timeout=60) == 5
    assert anyfork.wait(anyfork.fork(tasks.pid), timeout=60) != os.getpid()


def test_a_remote_error_keeps_its_type_and_the_remote_traceback(cluster: str) -> None:
    with pytest.raises(ValueError, match="remote failure") as caught:
        anyfork.wait(anyfork.fork(tasks.fail, "remote failure"), timeout=60)
    assert isinstance(caught.value, ray.exceptions.RayTaskError)
    assert "ray_tasks.py" in str(caught.value)  # where it was raised, over there


def test_unpicklable_arguments_fail_at_the_call(cluster: str) -> None:
    with pytest.raises(TypeError, match=r"cannot send the arguments of add.*must pickle"):
        anyfork.fork(tasks.add, threading.Lock(), 1)


def test_a_function_defined_in_a_test_is_sent_by_value(cluster: str) -> None:
    offset = 10
    plus = remote(lambda x: x + offset)
    assert anyfork.wait(anyfork.fork(plus, 1), timeout=60) == 11


def test_a_function_the_workers_cannot_load_fails_with_a_clear_error(cluster: str) -> None:
    with pytest.raises(RemoteImportError, match="could not load"):
        anyfork.wait(anyfork.fork(tasks.add, _UnimportableOnWorkers(), 1), timeout=60)
    from anyfork.dask import RemoteImportError as DaskRemoteImportError

    assert RemoteImportError is DaskRemoteImportError  # one class for every cluster


class _UnimportableOnWorkers:
    """Importable here (tests.test_ray), but pickled as from a module workers lack."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_import_missing_module, ())


def _import_missing_module() -> None:
    import importlib

    importlib.import_module("a_module_only_the_client_has")


def test_a_resource_request_the_embedded_ray_can_never_meet_fails_at_once(cluster: str) -> None:
    on_gpu = remote(num_gpus=1)(len)
    before = time.monotonic()
    with pytest.raises(ValueError, match=r"asks for \{'GPU': 1.0\}.*pending for ever"):
        anyfork.wait(anyfork.fork(on_gpu, "abc"), timeout=30)
    assert time.monotonic() - before < 10


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="torch is installed on 3.11 only")
def test_grad_mode_travels_to_the_worker(cluster: str) -> None:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        assert anyfork.wait(anyfork.fork(tasks.grad_mode), timeout=60) == (False, False)
    with torch.inference_mode():
        assert anyfork.wait(anyfork.fork(tasks.grad_mode), timeout=60) == (False, True)
    assert anyfork.wait(anyfork.fork(tasks.grad_mode), timeout=60) == (True, False)


# --- the same Future ----------------------------------------------------------------------


async def test_await_remote_forks_without_blocking_the_loop(
    cluster: str, anyio_backend: Any
) -> None:
    # blockbuster (autouse) fails any blocking call anyfork makes on an asyncio loop.
    assert await anyfork.fork(tasks.add, 20, 22) == 42
    futures = [anyfork.fork(tasks.add, i, i) for i in range(50)]
    assert await anyfork.collect_all(futures) == futures
    assert [f.value() for f in futures] == [2 * i for i in range(50)]


async def test_local_and_remote_forks_mix_in_collect_all_and_as_completed(
    cluster: str, anyio_backend: Any
) -> None:
    async def local_coroutine() -> int:
        return 1

    forks = [
        anyfork.fork(local_coroutine),
        anyfork.fork(sum, [1, 1]),  # a sync fork, on the worker pool
        anyfork.fork(tasks.add, 1, 2),
    ]
    assert [f.value() for f in await anyfork.collect_all(forks)] == [1, 2, 3]
    seen = {await f async for f in anyfork.as_completed([anyfork.fork(tasks.add, 2, 2), *forks])}
    assert seen == {1, 2, 3, 4}


def test_then_callbacks_never_run_on_rays_thread(cluster: str) -> None:
    threads: list[threading.Thread] = []
    future = anyfork.fork(tasks.add, 1, 1).then(
        lambda f: threads.append(threading.current_thread())
    )
    anyfork.wait(future, timeout=60)
    assert threads[0].name.startswith("anyfork-worker")
    assert not isinstance(threads[0], threading._DummyThread)  # Ray's C++ thread shows as one


def test_a_remote_fork_is_pending_as_remote(cluster: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    held = anyfork.fork(tasks.hold_until, str(release))
    try:
        [pending] = [p for p in anyfork.pending() if p.future is held]
        assert (pending.kind, pending.state) == ("remote", "running")
    finally:
        release.write_text("go")
    anyfork.wait(held, timeout=60)


# --- lifetimes and cancellation -------------------------------------------------------------


def test_a_dropped_remote_fork_still_runs(cluster: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    anyfork.fork(tasks.touch_after, str(marker), 0.2)  # the future is dropped at once
    _wait_for_files([marker])


def test_cancelling_queued_remote_work_never_runs_it(cluster: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    marker = tmp_path / "ran"
    started = [tmp_path / f"started-{i}" for i in range(2)]
    blockers = [anyfork.fork(tasks.hold_until, str(release), 60, str(s)) for s in started]
    _wait_for_files(started)  # the blockers hold both CPUs: the next task queues
    queued = anyfork.fork(tasks.touch_after, str(marker), 0)
    before = time.monotonic()
    assert queued.cancel()
    assert time.monotonic() - before < 5  # cancel() never blocks
    assert queued.cancelled()
    release.write_text("go")
    anyfork.wait_all(blockers, timeout=60)
    # Both CPUs take the tasks sent after it: had it not been dropped, it would have run first.
    anyfork.wait_all([anyfork.fork(tasks.add, i, i) for i in range(4)], timeout=60)
    assert not marker.exists()


def test_a_cancelled_running_fork_stays_cancelled_when_its_task_swallows_it(
    cluster: str, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    running = anyfork.fork(tasks.swallow_interrupt, str(started), 2)
    _wait_for_files([started])
    assert running.cancel()
    with pytest.raises(anyfork.CancelledError):
        anyfork.wait(running, timeout=30)
    # The task got Ray's KeyboardInterrupt, ignored it and returned: the fork stays cancelled.
    time.sleep(0)  # nothing to wait for: the fork's outcome is already final
    assert running.cancelled()


async def test_a_scope_joins_its_remote_forks(
    cluster: str, anyio_backend: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    async with anyfork.scope():
        touched = anyfork.fork(tasks.touch_after, str(marker), 0.2)
    assert touched.value() == str(marker)  # done, without awaiting it


async def test_a_scope_cancels_its_remote_forks(
    cluster: str, anyio_backend: Any, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    async with anyfork.scope(cancel_pending=True) as scope:
        held = anyfork.fork(tasks.hold_until, str(release))
        [pending] = scope.pending
        assert (pending.future, pending.kind, pending.state) == (held, "remote", "running")
    assert held.cancelled()
    await anyio.Path(release).write_text("go")


async def test_a_scope_reports_a_remote_failure_nobody_retrieved(
    cluster: str, anyio_backend: Any
) -> None:
    with pytest.raises(ExceptionGroup) as caught:
        async with anyfork.scope():
            anyfork.fork(tasks.fail, "unretrieved")
    [error] = caught.value.exceptions
    assert isinstance(error, ValueError)
    assert "unretrieved" in str(error)


# --- inside Ray tasks ---------------------------------------------------------------------


def test_nested_fork_and_wait_with_more_outer_tasks_than_cpus(cluster: str) -> None:
    # Three outer tasks on two CPUs, each blocking on forks of its own: unless the wait lends
    # the task's CPU out (ray.wait in the task's thread), the outer tasks hold both CPUs.
    outer = [anyfork.fork(tasks.nested_sum, 2) for _ in range(3)]
    assert anyfork.wait_all(outer, timeout=90) == [1 + 2] * 3


# --- failures of the cluster ----------------------------------------------------------------


def test_a_killed_worker_fails_its_fork_once(cluster: str, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        anyfork.wait(anyfork.fork(tasks.die_once_logged, str(log)), timeout=90)
    assert log.read_text() == "ran\n"  # Ray's default would have run it 4 times
    assert anyfork.wait(anyfork.fork(tasks.add, 1, 1), timeout=60) == 2


# Last: it closes the module's Ray.
def test_close_fails_pending_forks_and_later_forks_raise(cluster: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    held = anyfork.fork(tasks.hold_until, str(release))
    before = time.monotonic()
    anyfork.ray.close()
    assert time.monotonic() - before < 60
    with pytest.raises(RuntimeError, match="closed before"):
        anyfork.wait(held, timeout=10)
    with pytest.raises(RuntimeError, match=r"anyfork.ray is closed: call anyfork.ray.connect"):
        anyfork.fork(tasks.add, 1, 1)


def _wait_for_files(paths: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, "the tasks did not start"
        time.sleep(0.02)


# --- scripts ---------------------------------------------------------------------------------


def run_ray_script(
    tmp_path: Path, source: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a script file in tmp_path with a marker in its environment, then check that no
    process of it (Ray's included) and no temporary directory of its Ray is left behind.
    Returns what it printed and when it ended (``time.monotonic()``)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    mark = uuid.uuid4().hex
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ)
    env.update(
        {"ANYFORK_TEST_MARK": mark, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(temp)}
    )
    env.pop("RAY_ADDRESS", None)
    # TMPDIR is too long for Ray's sockets: anyfork puts its Ray's directory in /tmp then.
    temp_dirs_before = set(Path("/tmp").glob("anyfork-ray-*"))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    ended = time.monotonic()
    assert processes_marked(mark) == [], "a Ray process outlived its script"
    assert not [p.name for p in Path("/tmp").iterdir() if mark in p.name]
    assert list(temp.iterdir()) == [], "the embedded Ray's temporary directory was left"
    left = set(Path("/tmp").glob("anyfork-ray-*")) - temp_dirs_before
    assert not left, f"the embedded Ray's temporary directory was left: {left}"
    return result, ended


def processes_marked(mark: str, timeout: float = 15) -> list[int]:
    """The processes whose environment holds ``ANYFORK_TEST_MARK=mark``, once none is left
    or ``timeout`` seconds have passed."""
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
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds leftover processes in /proc")
def test_a_script_forks_onto_an_embedded_ray_joined_at_exit_within_the_bound(
    tmp_path: Path,
) -> None:
    # One script for both ends of the exit join (a Ray start costs seconds): a fork that
    # finishes within the bound is waited for, one that outlasts it is cancelled.
    result, ended = run_ray_script(
        tmp_path,
        """
        import os
        import time
        import anyfork
        import anyfork.ray


        @anyfork.ray.remote
        def square(x: int) -> int:
            return x * x


        @anyfork.ray.remote
        def fail() -> None:
            raise KeyError("remote")


        @anyfork.ray.remote
        def last(path: str) -> None:
            time.sleep(1)
            open(path, "w").write("done")


        @anyfork.ray.remote(num_cpus=0)
        def too_long() -> None:
            time.sleep(120)


        if __name__ == "__main__":
            anyfork.configure(exit_timeout=6)
            print(anyfork.wait_all([anyfork.fork(square, i) for i in range(5)]))
            try:
                anyfork.wait(anyfork.fork(fail))
            except KeyError:
                print("KeyError")
            anyfork.fork(last, os.path.abspath("last"))  # joined at exit
            anyfork.fork(too_long)  # cancelled at the exit bound
            print("exiting", time.monotonic(), flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[:2] == ["[0, 1, 4, 9, 16]", "KeyError"], result.stderr
    assert lines[2].startswith("exiting")
    # Within the exit bound, plus the grace anyfork gives the participants to stop (Ray's
    # shutdown among them), plus Python's own exit: generous, on a busy machine.
    exit_took = ended - float(lines[2].split()[1])
    assert exit_took < 6 + 2 + 12, exit_took
    print(f"exit took {exit_took:.1f} s")
    assert (tmp_path / "last").read_text() == "done"
    assert "did not finish within the exit bound of 6" in result.stderr
    assert "too_long" in result.stderr
    assert "last" not in result.stderr.split("exit bound")[-1].split("\n")[0]
