"""PyTorch interop: torch futures in, grad mode into forks, to_torch, exit safety.

Runs where torch is installed (the CPU wheel on Python 3.11, by nox); skipped elsewhere.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any

import anyio
import pytest

import anyfork

from .conftest import run_in_thread, run_script

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.timeout(60),
    # torch 2.13 deprecates torch.jit.fork and torch.jit.script; these tests use them on purpose.
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
]


class Block(torch.nn.Module):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: Any) -> Any:
        return torch.relu(self.linear(x))


def set_later(future: Any, value: object, delay: float = 0.05) -> threading.Thread:
    def complete() -> None:
        time.sleep(delay)
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    thread = threading.Thread(target=complete)
    thread.start()
    return thread


# --- forking torch work ------------------------------------------------------------------


def test_fork_an_nn_module_and_torch_builtins_in_a_script() -> None:
    block = Block()
    x = torch.ones(4, 8)
    out = anyfork.fork(block, x)
    neg = anyfork.fork(torch.neg, x)
    mm = anyfork.fork(torch.mm, x, x.t())
    assert torch.equal(anyfork.wait(out), block(x))
    assert torch.equal(anyfork.wait(neg), -x)
    assert anyfork.wait(mm).shape == (4, 4)


@pytest.mark.anyio
async def test_fork_an_nn_module_in_an_async_app() -> None:
    block = Block()
    x = torch.ones(2, 8)
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def forward(x: Any) -> Any:
        threads.append(threading.get_ident())
        return block(x)

    assert torch.equal(await anyfork.fork(forward, x), block(x))
    assert threads[0] != loop_thread  # off the loop


# --- grad mode follows the fork ------------------------------------------------------------


def modes() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def requires_grad_of_forward(block: Any) -> bool:
    return bool(block(torch.ones(1, 8)).requires_grad)


def test_grad_mode_follows_a_fork_made_under_no_grad() -> None:
    block = Block()
    with torch.no_grad():
        inside = anyfork.fork(modes)
        graph = anyfork.fork(requires_grad_of_forward, block)
    outside = anyfork.fork(modes)
    assert anyfork.wait(inside) == (False, False)
    assert anyfork.wait(graph) is False  # no autograd graph built in the worker thread
    assert anyfork.wait(outside) == (True, False)


def test_inference_mode_follows_the_fork() -> None:
    with torch.inference_mode():
        inside = anyfork.fork(modes)
        tensor = anyfork.fork(torch.ones, 2)
    assert anyfork.wait(inside) == (False, True)
    assert anyfork.wait(tensor).is_inference()
    assert not anyfork.wait(anyfork.fork(torch.ones, 2)).is_inference()


def test_grad_mode_is_restored_in_the_thread_that_ran_the_fork() -> None:
    anyfork.configure(worker_threads=1)
    with torch.no_grad():
        anyfork.wait(anyfork.fork(modes))
    # The same single worker thread runs the next fork with grad enabled again.
    assert anyfork.wait(anyfork.fork(modes)) == (True, False)


def test_a_stolen_fork_runs_in_its_own_mode_not_the_waiters() -> None:
    gate = threading.Event()
    anyfork.configure(worker_threads=1)
    blocker = anyfork.fork(gate.wait, 10)  # hold the only worker
    fut = anyfork.fork(modes)  # made with grad enabled
    with torch.no_grad():
        assert anyfork.wait(fut) == (True, False)  # stolen by this thread, still grad mode
    gate.set()
    anyfork.wait(blocker)


@pytest.mark.anyio
async def test_grad_mode_follows_sync_forks_made_on_a_loop() -> None:
    with torch.no_grad():
        inside = anyfork.fork(modes)
    assert await inside == (False, False)
    assert await anyfork.fork(modes) == (True, False)


def test_torch_is_never_imported_by_anyfork() -> None:
    result = run_script(
        """
        import sys, anyio, anyfork

        async def main():
            await anyfork.fork(sum, [1, 2])
            async with anyfork.scope():
                anyfork.fork(anyio.sleep, 0)

        anyio.run(main)
        anyfork.wait(anyfork.fork(len, "abc"))
        print("torch" in sys.modules)
        """
    )
    assert result.stdout == "False\n", result.stderr


# --- torch futures in ----------------------------------------------------------------------


def test_wait_on_a_torch_future_set_from_another_thread() -> None:
    future = torch.futures.Future()
    thread = set_later(future, 42)
    assert anyfork.wait(future, timeout=10) == 42
    thread.join()


def test_wait_on_a_torch_future_already_done_and_failed() -> None:
    done = torch.futures.Future()
    done.set_result("ready")
    assert anyfork.wait(done) == "ready"
    failed = torch.futures.Future()
    error = ValueError("bad batch")
    failed.set_exception(error)
    with pytest.raises(ValueError, match="bad batch") as caught:
        anyfork.wait(failed)
    assert caught.value is error


def test_wait_timeout_on_a_torch_future_that_never_completes() -> None:
    with pytest.raises(TimeoutError):
        anyfork.wait(torch.futures.Future(), timeout=0.05)


@pytest.mark.anyio
async def test_await_torch_futures_without_holding_a_thread() -> None:
    threads_before = threading.active_count()
    futures = [torch.futures.Future() for _ in range(50)]
    results: list[Any] = [None] * 50

    async def waiter(index: int) -> None:
        results[index] = await anyfork.wait_async(futures[index])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for index in range(50):
                tg.start_soon(waiter, index)
            await anyio.sleep(0.05)
            # Fifty pending torch futures awaited: no thread was started for them.
            assert threading.active_count() <= threads_before + 1
            completer = threading.Thread(
                target=lambda: [f.set_result(i) for i, f in enumerate(futures)]
            )
            completer.start()
    await anyio.to_thread.run_sync(completer.join)  # a blocking join: not on the loop
    assert results == list(range(50))


@pytest.mark.anyio
async def test_await_a_failed_torch_future_raises_its_error() -> None:
    future = torch.futures.Future()
    thread = set_later(future, KeyError("missing"))
    with pytest.raises(KeyError, match="missing"):
        await anyfork.wait_async(future)
    await anyio.to_thread.run_sync(thread.join)


def test_a_torch_future_completed_after_its_loop_closed_is_harmless() -> None:
    future = torch.futures.Future()

    async def wait_briefly() -> None:
        with anyio.move_on_after(0.05):
            await anyfork.wait_async(future)

    anyio.run(wait_briefly)
    future.set_result(1)  # the callback finds the waiting loop gone
    assert anyfork.wait(future) == 1


def _script_functions() -> tuple[Any, Any, Any]:
    def square(x: torch.Tensor) -> torch.Tensor:
        return x * x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        scripted_square = torch.jit.script(square)

        def fork_square(x: torch.Tensor) -> torch.jit.Future[torch.Tensor]:
            return torch.jit.fork(scripted_square, x)

        def fail(x: torch.Tensor) -> torch.Tensor:
            raise ValueError("scripted failure")

        scripted_fail = torch.jit.script(fail)

        def fork_fail(x: torch.Tensor) -> torch.jit.Future[torch.Tensor]:
            return torch.jit.fork(scripted_fail, x)

        return scripted_square, torch.jit.script(fork_square), torch.jit.script(fork_fail)


# In TorchScript, fork is asynchronous and a failure is stored in the future; a
# torch.jit.fork called from Python runs eagerly and raises at the call.
square, fork_square, fork_fail = _script_functions()


@pytest.mark.parametrize("where", ["thread", "asyncio", "trio"])
def test_futures_from_torch_jit_fork_and_a_scripted_function(where: str) -> None:
    x = torch.full((3,), 3.0)
    jit_future = torch.jit.fork(square, x)  # torch._C.Future, not torch.futures.Future
    returned = fork_square(x)  # a scripted function returning a future
    chained = jit_future.then(lambda f: f.value() + 1)
    failing = fork_fail(x)

    def check(values: list[Any], error: BaseException) -> None:
        assert torch.equal(values[0], x * x)
        assert torch.equal(values[1], x * x)
        assert torch.equal(values[2], x * x + 1)
        assert "scripted failure" in str(error)

    if where == "thread":
        values = run_in_thread(lambda: [anyfork.wait(f) for f in (jit_future, returned, chained)])
        with pytest.raises(Exception) as caught:
            anyfork.wait(failing)
        check(values, caught.value)
    else:

        async def main() -> tuple[list[Any], BaseException]:
            values = [await anyfork.wait_async(f) for f in (jit_future, returned, chained)]
            try:
                await anyfork.wait_async(failing)
            except Exception as exc:
                return values, exc
            raise AssertionError("the failing future did not fail")

        check(*anyio.run(main, backend=where))


@pytest.mark.anyio
async def test_collect_all_and_wait_all_take_a_mix_of_anyfork_and_torch_futures() -> None:
    mine = anyfork.fork(torch.neg, torch.ones(2))
    theirs = torch.futures.Future()
    jit_future = torch.jit.fork(square, torch.full((2,), 2.0))
    thread = set_later(theirs, "torch")
    everything = await anyfork.collect_all([mine, theirs, jit_future])
    assert [type(f) for f in everything] == [anyfork.Future] * 3
    assert torch.equal(everything[0].value(), -torch.ones(2))
    assert everything[1].value() == "torch"
    assert torch.equal(everything[2].value(), torch.full((2,), 4.0))
    values = await anyio.to_thread.run_sync(anyfork.wait_all, [mine, theirs, jit_future])
    assert values[1] == "torch"
    await anyio.to_thread.run_sync(thread.join)


# --- to_torch ------------------------------------------------------------------------------


def test_to_torch_gives_a_torch_future_that_follows_ours() -> None:
    fut = anyfork.fork(torch.neg, torch.ones(2))
    converted = fut.to_torch()
    assert isinstance(converted, torch.futures.Future)
    assert torch.equal(converted.wait(), -torch.ones(2))
    both = torch.futures.collect_all([converted, anyfork.fork(len, "ab").to_torch()])
    assert [f.value() for f in both.wait()][1] == 2


def test_to_torch_passes_errors_and_cancellation_on() -> None:
    def fails() -> None:
        raise ValueError("model failed")

    with pytest.raises(ValueError, match="model failed"):
        anyfork.fork(fails).to_torch().wait()
    pending: anyfork.Future[int] = anyfork.Future()
    converted = pending.to_torch()
    pending.cancel()
    with pytest.raises(anyfork.CancelledError):
        converted.wait()


# --- exit safety ---------------------------------------------------------------------------


@pytest.mark.parametrize("repeat", range(4))  # without the fix, about 1 run in 3 crashed
def test_a_script_exiting_with_torch_work_pending_exits_cleanly(tmp_path: Any, repeat: int) -> None:
    # TorchScript needs the source of what it compiles, so this script is a real file.
    script = tmp_path / "pending_torch_work.py"
    script.write_text(
        textwrap.dedent(
            """
            import warnings
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import torch, anyfork

            def heavy(x: torch.Tensor) -> torch.Tensor:
                for _ in range(200):
                    x = torch.tanh(x @ x)
                return x

            scripted = torch.jit.script(heavy)

            def fork_heavy(x: torch.Tensor) -> torch.jit.Future[torch.Tensor]:
                return torch.jit.fork(scripted, x)

            fork_in_script = torch.jit.script(fork_heavy)

            x = torch.rand(512, 512)
            # TorchScript work on torch's inter-op pool, handed to anyfork, never waited for
            everything = anyfork.collect_all([fork_in_script(x) for _ in range(4)])
            anyfork.fork(heavy, x)  # sync work in anyfork's pool, never waited for
            print("main done", everything.done(), flush=True)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "terminate called" not in result.stderr
    assert result.stdout == "main done False\n"  # the work was pending at exit


def test_wait_and_await_futures_from_torch_distributed_rpc() -> None:
    # RPC is set up once per process, so in a fresh one: a world of one, on loopback.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_script(
        f"""
        import os, warnings
        warnings.simplefilter("ignore")
        import anyio, torch
        import torch.distributed.rpc as rpc
        import anyfork

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
        rpc.init_rpc("worker0", rank=0, world_size=1)
        try:
            remote = rpc.rpc_async("worker0", torch.add, args=(torch.ones(2), 1))
            print(anyfork.wait(remote, timeout=30).tolist())

            async def main():
                return await anyfork.wait_async(
                    rpc.rpc_async("worker0", torch.mul, args=(torch.ones(2), 3))
                )

            print(anyio.run(main).tolist())
        finally:
            rpc.shutdown()
        """,
        timeout=120,
    )
    assert result.stdout == "[2.0, 2.0]\n[3.0, 3.0]\n", result.stderr


def test_a_compiled_module_warmed_once_per_grad_mode_fans_out_without_compiling_again() -> None:
    # The torch docs' advice for torch.compile: warm once per grad mode, then fan out.
    graphs: list[object] = []

    def counting_backend(graph: Any, example_inputs: Any) -> Any:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()  # no graph cached by an earlier test
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    compiled = torch.compile(module, backend=counting_backend)
    x = torch.randn(4, 16)
    compiled(x)
    with torch.no_grad():
        compiled(x)
    warmed = len(graphs)
    assert warmed >= 1

    with torch.no_grad():
        without_grad = anyfork.wait_all([anyfork.fork(compiled, x) for _ in range(16)])
    with_grad = anyfork.wait_all([anyfork.fork(compiled, x) for _ in range(16)])

    # Unwarmed, this fan-out compiles up to dynamo's recompile limit (8 graphs on torch 2.13)
    # every time; warmed, it compiles nothing in most runs and a few graphs now and then (torch's
    # guards race under threads: "Unexpected recompilation"), never up to the limit.
    extra = len(graphs) - warmed
    assert extra < torch._dynamo.config.recompile_limit, f"{extra} graphs compiled in the fan-out"
    expected = module(x)
    for output in without_grad:
        assert not output.requires_grad
        assert torch.equal(output, expected.detach())
    for output in with_grad:
        assert output.requires_grad
        assert torch.equal(output, expected)


# --- torch futures are not forks (issue 17, items 9 and 17) ------------------------------


def test_polling_a_pending_torch_future_with_timed_waits_does_not_grow_memory() -> None:
    import tracemalloc

    # A base torch future (what torch.jit.fork and collect_all return) that never completes.
    source = torch.futures.collect_all([torch.futures.Future()])

    def poll() -> None:
        with pytest.raises(TimeoutError):
            anyfork.wait(source, timeout=0)

    for _ in range(100):
        poll()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            poll()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Each poll used to leave a follower, a torch callback and an exit-join entry behind.
    assert grown < 300_000
    assert not [fork for fork in anyfork.pending() if "torch" in fork.name]


def test_a_script_that_gave_up_waiting_for_a_torch_future_exits_at_once() -> None:
    started = time.monotonic()
    result = run_script(
        """
        import time
        import torch, anyfork

        anyfork.configure(exit_timeout=60)
        never = torch.futures.collect_all([torch.futures.Future()])
        try:
            anyfork.wait(never, timeout=0.1)
        except TimeoutError:
            print("gave up", flush=True)
        """,
        timeout=120,
    )
    # The exit bound is 60 seconds: the script used to wait for all of it.
    assert time.monotonic() - started < 40
    assert result.returncode == 0, result.stderr
    assert "gave up" in result.stdout
    assert "ERROR" not in result.stderr and "fork(s)" not in result.stderr, result.stderr
