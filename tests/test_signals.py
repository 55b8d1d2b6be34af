"""Forking from a signal handler: Python runs the handler in the main thread between any two
bytecodes, possibly while that thread is inside anyfork holding a lock. anyfork's locks are
reentrant and its lazy set-up never waits for the code the handler interrupted, so the
handler's fork goes through instead of deadlocking.

On an event loop's thread, handlers belong to the loop (``loop.add_signal_handler``,
``trio.open_signal_receiver``), where they run as loop callbacks: see docs/scripts.md."""

from __future__ import annotations

import sys

import pytest

from .conftest import run_script

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform == "win32", reason="setitimer is POSIX only"),
]

# A timer signal every millisecond lands all over the main thread's fork/wait code; the handler
# forks (and sometimes waits). Before locks were reentrant this hung within a few hundred
# rounds; the subprocess timeout turns a hang into a failure.
FORK_IN_SIGNAL_HANDLER = """
import signal, sys, anyfork

async def double(x):
    return 2 * x

handled = []

def on_alarm(signum, frame):
    handled.append(anyfork.fork(abs, -len(handled)))
    if len(handled) % 2:
        handled.append(anyfork.fork(double, 1))
    if len(handled) % 7 == 0:
        anyfork.wait(anyfork.fork(abs, -1))

signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
"""


@pytest.mark.parametrize("repeat", range(3))
def test_forking_from_a_signal_handler_in_a_script_never_deadlocks(repeat: int) -> None:
    result = run_script(
        FORK_IN_SIGNAL_HANDLER
        + """
total = 0
for i in range(3000):
    total += anyfork.wait(anyfork.fork(abs, -i))
    if i % 10 == 0:
        total += anyfork.wait(anyfork.fork(double, 0))
signal.setitimer(signal.ITIMER_REAL, 0)
anyfork.wait_all(handled, timeout=30)
print("main", total, "handled", len(handled) > 0)
""",
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"main {sum(range(3000))} handled True\n"
    assert result.stderr == ""


def test_signal_handlers_that_fork_while_the_background_loop_starts_share_that_loop() -> None:
    # Building the background loop (a selector, a socket pair) may take longer than a fast
    # timer's period (a slow or busy machine, free-threaded Python): a handler then runs
    # inside that start, and so on. Each used to start a loop of its own, without limit:
    # >140 loops, RecursionError, out of file descriptors. Raising the signal from inside
    # each loop build stands in for the timer, deterministically; the cap keeps the run
    # before the fix finite.
    result = run_script(
        """
import signal, anyfork
import anyfork._background as background

async def double(x):
    return 2 * x

built, handled = [], []
new_asyncio_loop = background._new_asyncio_loop

def slow_new_asyncio_loop():
    built.append(1)
    if len(built) <= 50:
        signal.raise_signal(signal.SIGUSR1)  # the handler runs here, inside the start
        signal.raise_signal(signal.SIGUSR1)
    return new_asyncio_loop()

background._new_asyncio_loop = slow_new_asyncio_loop

def on_signal(signum, frame):
    handled.append(anyfork.fork(double, len(handled)))

signal.signal(signal.SIGUSR1, on_signal)
first = anyfork.fork(double, 21)
print(anyfork.wait(first, timeout=20), [anyfork.wait(f, timeout=20) for f in handled])
print("loops built", len(built))
""",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "42 [0, 2]\nloops built 1\n"
    assert result.stderr == ""


def test_starting_the_background_loop_never_takes_asyncios_policy_lock() -> None:
    # The first asyncio.new_event_loop() in a process sets the event loop policy up under a
    # plain lock. A signal handler that forks a coroutine while the main thread is in there
    # (CI hit it with the timer above) would wait on that lock forever. Holding the lock in
    # another thread stands in for the interrupted main thread, deterministically.
    result = run_script(
        """
import asyncio.events, anyfork

async def double(x):
    return 2 * x

assert asyncio.events._event_loop_policy is None  # nothing set the policy up yet
with asyncio.events._lock:
    print(anyfork.wait(anyfork.fork(double, 21), timeout=20))
""",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "42\n"


# The handler runs while the loop idles in select(): the loop's next turn is 20 s away.
# Before, on asyncio, the fork's job waited for that turn (call_soon does not wake the
# selector); uvloop and trio were woken already.
SYNC_FORK_IN_A_SIGNAL_HANDLER_ON_AN_IDLE_LOOP = """
import os, signal, sys, threading, time, anyio, anyfork

backend = sys.argv[1]

async def main():
    finished = anyio.Event()
    token = anyio.lowlevel.current_token()
    forks = []

    def on_signal(signum, frame):
        fork = anyfork.fork(abs, -7)  # a sync fork, made on the loop's thread
        fork.add_done_callback(lambda _: anyio.from_thread.run_sync(finished.set, token=token))
        forks.append(fork)

    signal.signal(signal.SIGUSR1, on_signal)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    began = time.monotonic()
    with anyio.move_on_after(20):
        await finished.wait()
    print(f"{forks[0].done() and forks[0].value()} after {time.monotonic() - began:.1f} s")

options = {"loop_factory": __import__("uvloop").new_event_loop} if backend == "uvloop" else {}
anyio.run(main, backend="trio" if backend == "trio" else "asyncio", backend_options=options)
"""


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
@pytest.mark.parametrize("repeat", range(2))
def test_a_sync_fork_made_in_a_signal_handler_starts_while_the_loop_idles(
    backend: str, repeat: int
) -> None:
    result = run_script(
        f"import sys; sys.argv[1:] = [{backend!r}]\n"
        + SYNC_FORK_IN_A_SIGNAL_HANDLER_ON_AN_IDLE_LOOP,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    value, _, seconds, _ = result.stdout.split()
    assert value == "7", result.stdout
    assert float(seconds) < 10, result.stdout  # not the 20 s until the loop's next turn
