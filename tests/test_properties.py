"""A property-based state machine over one Future, driven from threads and event loops.

Each step runs in a place hypothesis picks: the test's thread, a plain worker thread, or
the thread of a running asyncio, uvloop or trio loop. Waiters (blocking ``wait`` in
threads, ``await``/``wait_async``/``collect_all`` on the three loops) stay pending across
steps, so they race with the completion. At the end every waiter, callback and ``then``
child is checked against the one outcome the model says the future has.

Invariants:

* the future completes at most once: only the first of set_result/set_exception/cancel
  wins, the later ones raise ``AlreadyCompletedError`` or return False;
* every callback (``add_done_callback`` and ``then``) runs exactly once, in registration
  (FIFO) order, and sees the final outcome;
* every waiter, whatever its kind, thread or loop, sees the same outcome;
* nothing blocks forever: every waiter finishes within a bound once the future is done.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import anyio.from_thread
import pytest

# Not installed on free-threaded Python (no free-threaded wheel): see noxfile.py.
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import anyfork

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

Outcome = tuple[Any, ...]
DONE_BOUND = 10.0  # seconds a waiter may take once the future is done: "never" if exceeded

LOOPS = ["asyncio", "trio"] + (["uvloop"] if uvloop else [])
PLACES = ["test thread", "worker thread", *(f"{loop} loop" for loop in LOOPS)]
WAITER_KINDS = [
    "wait in a thread",
    "wait_all in a thread",
    *(f"{how} on {loop}" for loop in LOOPS for how in ("await", "wait_async", "collect_all")),
]


def observe(get: Callable[[], Any]) -> Outcome:
    try:
        return ("result", get())
    except anyfork.CancelledError:
        return ("cancelled",)
    except Exception as exc:
        return ("error", exc)


async def observe_async(awaitable: Any) -> Outcome:
    try:
        return ("result", await awaitable)
    except anyfork.CancelledError:
        return ("cancelled",)
    except Exception as exc:
        return ("error", exc)


class Places:
    """Run a function in a named place and return its result."""

    def __init__(self, stack: ExitStack) -> None:
        # Steps run in ``pool``; blocking waiters get threads of their own, so that however
        # many wait at once, a step never queues behind them.
        self.pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(2))
        self.waiter_pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(64))
        self.portals: dict[str, anyio.from_thread.BlockingPortal] = {}
        for loop in LOOPS:
            if loop == "uvloop":
                backend, options = "asyncio", {"loop_factory": uvloop.new_event_loop}
            else:
                backend, options = loop, {}
            self.portals[loop] = stack.enter_context(
                anyio.from_thread.start_blocking_portal(backend, options)
            )

    def call(self, place: str, func: Callable[[], Any]) -> Any:
        if place == "test thread":
            return func()
        if place == "worker thread":
            return self.pool.submit(func).result(timeout=DONE_BOUND)
        # Boxed: a portal awaits whatever awaitable a function returns, Futures included.
        portal = self.portals[place.removesuffix(" loop")]
        return portal.call(lambda: [func()])[0]

    def start_waiter(
        self, kind: str, future: anyfork.Future[Any]
    ) -> concurrent.futures.Future[Any]:
        if kind == "wait in a thread":
            return self.waiter_pool.submit(observe, future.wait)
        if kind == "wait_all in a thread":
            return self.waiter_pool.submit(observe, lambda: anyfork.wait_all([future])[0])
        how, _, loop = kind.partition(" on ")

        async def waiter() -> Outcome:
            if how == "await":
                return await observe_async(future)
            if how == "wait_async":
                return await observe_async(anyfork.wait_async(future))
            (only,) = await anyfork.collect_all([future])
            assert only is future
            return observe(future.value)

        return self.portals[loop].start_task_soon(waiter)


class FutureMachine(RuleBasedStateMachine):
    places: Places

    def __init__(self) -> None:
        super().__init__()
        self.future: anyfork.Future[Any] = anyfork.Future(name="under test")
        self.outcome: Outcome | None = None
        self.registered: list[int] = []
        self.ran: list[tuple[int, Outcome]] = []
        self.ran_lock = threading.Lock()
        self.children: list[tuple[int, anyfork.Future[Outcome]]] = []
        self.waiters: list[tuple[str, concurrent.futures.Future[Any]]] = []

    # -- completion ------------------------------------------------------------------

    def _complete(self, how: str, place: str, payload: Any) -> None:
        def attempt() -> Outcome:
            try:
                if how == "cancel":
                    return ("returned", self.future.cancel())
                if how == "set_result":
                    self.future.set_result(payload)
                else:
                    self.future.set_exception(payload)
                return ("returned", None)
            except anyfork.AlreadyCompletedError:
                return ("already completed",)

        got = self.places.call(place, attempt)
        if self.outcome is None:
            assert got == ("returned", True if how == "cancel" else None)
            self.outcome = {
                "cancel": ("cancelled",),
                "set_result": ("result", payload),
                "set_exception": ("error", payload),
            }[how]
        elif how == "cancel":
            assert got == ("returned", False)
        else:
            assert got == ("already completed",)

    @rule(place=st.sampled_from(PLACES), value=st.integers() | st.text(max_size=3))
    def set_result(self, place: str, value: Any) -> None:
        self._complete("set_result", place, value)

    @rule(place=st.sampled_from(PLACES), message=st.text(max_size=3))
    def set_exception(self, place: str, message: str) -> None:
        self._complete("set_exception", place, ValueError(message))

    @rule(place=st.sampled_from(PLACES))
    def cancel(self, place: str) -> None:
        self._complete("cancel", place, None)

    # -- callbacks ---------------------------------------------------------------------

    def _record(self, ident: int, done: anyfork.Future[Any]) -> Outcome:
        outcome = observe(done.value)
        with self.ran_lock:
            self.ran.append((ident, outcome))
        return outcome

    @rule(place=st.sampled_from(PLACES))
    def add_done_callback(self, place: str) -> None:
        ident = len(self.registered)
        self.registered.append(ident)
        self.places.call(
            place, lambda: self.future.add_done_callback(lambda f: self._record(ident, f))
        )
        self._check_callbacks_so_far()

    @rule(place=st.sampled_from(PLACES))
    def then(self, place: str) -> None:
        ident = len(self.registered)
        self.registered.append(ident)
        child = self.places.call(place, lambda: self.future.then(lambda f: self._record(ident, f)))
        self.children.append((ident, child))
        self._check_callbacks_so_far()

    def _check_callbacks_so_far(self) -> None:
        # Callbacks run in the completing thread before set_* returns, or inline when
        # registered on a done future: so at every step, all or none have run.
        with self.ran_lock:
            ran = [ident for ident, _ in self.ran]
        assert ran == (self.registered if self.outcome is not None else [])

    # -- waiters -----------------------------------------------------------------------

    @rule(kind=st.sampled_from(WAITER_KINDS))
    def start_waiter(self, kind: str) -> None:
        self.waiters.append((kind, self.places.start_waiter(kind, self.future)))

    @precondition(lambda self: self.outcome is None)
    @rule(place=st.sampled_from(["test thread", "worker thread"]))
    def wait_times_out_while_pending(self, place: str) -> None:
        got = self.places.call(place, lambda: observe(lambda: self.future.wait(timeout=0.001)))
        # The only way the wait can end is the timeout: nothing completes the future now.
        assert got[0] == "error"
        assert isinstance(got[1], TimeoutError)

    @precondition(lambda self: self.outcome is not None)
    @rule(place=st.sampled_from(PLACES))
    def done_future_answers_at_once(self, place: str) -> None:
        assert self.places.call(place, lambda: observe(self.future.value)) == self.outcome

    # -- invariants and the end --------------------------------------------------------

    @invariant()
    def state_matches_the_model(self) -> None:
        assert self.future.done() == (self.outcome is not None)
        assert self.future.cancelled() == (self.outcome == ("cancelled",))

    def teardown(self) -> None:
        if self.outcome is None:
            self._complete("set_result", "worker thread", "completed at teardown")
        assert self.outcome is not None
        assert observe(self.future.value) == self.outcome
        for kind, waiter in self.waiters:
            assert waiter.result(timeout=DONE_BOUND) == self.outcome, kind
        with self.ran_lock:
            assert [ident for ident, _ in self.ran] == self.registered
            assert all(outcome == self.outcome for _, outcome in self.ran)
        for ident, child in self.children:
            assert child.wait(timeout=DONE_BOUND) == self.outcome, ident


@pytest.fixture(scope="module")
def places() -> Iterator[Places]:
    with ExitStack() as stack:
        yield Places(stack)


@pytest.mark.timeout(300)
def test_one_future_driven_from_threads_and_loops(places: Places) -> None:
    FutureMachine.places = places
    run_state_machine_as_test(
        FutureMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=25,  # fewer steps than waiter threads: none ever queues
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
