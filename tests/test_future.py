"""Future[T] on its own: completion, callbacks, then-chains, errors, cancellation."""

from __future__ import annotations

import asyncio
import gc
import logging
import pickle
import sys
import sysconfig
import threading
import time
import weakref
from typing import Any

import pytest

import anyfork
from anyfork import AlreadyCompletedError, Future, NotReadyError
from anyfork._reports import flush_reports

from .conftest import garbage_collector_disabled, logged_within, run_in_thread, run_script


def test_set_result_then_wait_and_value_return_the_same_object() -> None:
    fut: Future[object] = Future()
    payload = object()
    fut.set_result(payload)
    assert fut.done()
    assert fut.wait() is payload
    assert fut.value() is payload


def test_set_exception_is_reraised_as_the_same_object() -> None:
    fut: Future[int] = Future()
    error = ValueError("boom")
    fut.set_exception(error)
    with pytest.raises(ValueError) as first:
        fut.wait()
    with pytest.raises(ValueError) as second:
        fut.value()
    assert first.value is error
    assert second.value is error


def test_value_of_a_pending_future_raises_not_ready() -> None:
    fut: Future[int] = Future()
    with pytest.raises(NotReadyError, match="still pending"):
        fut.value()
    assert isinstance(NotReadyError("x"), RuntimeError)


@pytest.mark.parametrize("second", ["result", "exception"])
def test_completing_twice_raises_and_changes_nothing(second: str) -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    with pytest.raises(AlreadyCompletedError, match="completes only once"):
        if second == "result":
            fut.set_result(2)
        else:
            fut.set_exception(ValueError())
    assert fut.value() == 1


def test_set_exception_rejects_non_exceptions() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TypeError, match="exception instance"):
        fut.set_exception("not an exception")  # type: ignore[arg-type]
    assert not fut.done()


@pytest.mark.parametrize("repeat", range(5))
def test_exactly_one_of_racing_threads_completes_the_future(repeat: int) -> None:
    fut: Future[int] = Future()
    barrier = threading.Barrier(8)
    winners: list[int] = []

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            if index % 2:
                fut.set_result(index)
            else:
                fut.set_exception(RuntimeError(index))
            winners.append(index)
        except AlreadyCompletedError:
            pass

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(winners) == 1
    if winners[0] % 2:
        assert fut.value() == winners[0]
    else:
        with pytest.raises(RuntimeError):
            fut.value()


def test_callbacks_run_once_in_registration_order_in_the_completing_thread() -> None:
    fut: Future[int] = Future()
    calls: list[tuple[str, int]] = []
    for name in "abc":
        fut.add_done_callback(lambda f, name=name: calls.append((name, threading.get_ident())))
    completer = run_in_thread(lambda: (fut.set_result(1), threading.get_ident())[1])
    assert calls == [("a", completer), ("b", completer), ("c", completer)]


def test_callback_on_a_done_future_runs_inline_at_registration() -> None:
    fut: Future[int] = Future()
    fut.set_result(3)
    seen: list[Future[int]] = []
    fut.add_done_callback(seen.append)
    assert seen == [fut]


def test_then_and_add_done_callback_share_one_fifo_queue() -> None:
    fut: Future[int] = Future()
    order: list[str] = []
    fut.add_done_callback(lambda f: order.append("callback 1"))
    fut.then(lambda f: order.append("then"))
    fut.add_done_callback(lambda f: order.append("callback 2"))
    fut.set_result(0)
    assert order == ["callback 1", "then", "callback 2"]


def test_a_failing_done_callback_is_logged_and_later_callbacks_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fut: Future[int] = Future()
    later: list[int] = []

    def broken(_: Future[int]) -> None:
        raise KeyError("broken callback")

    fut.add_done_callback(broken)
    fut.add_done_callback(lambda f: later.append(f.value()))
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        fut.set_result(5)
    assert later == [5]
    assert any("broken" in r.getMessage() for r in caplog.records)
    assert caplog.records[0].exc_info is not None


def test_then_holds_the_callback_result() -> None:
    fut: Future[int] = Future()
    child = fut.then(lambda f: f.value() * 2)
    fut.set_result(21)
    assert child.wait() == 42


def test_a_failing_then_callback_fails_only_the_child_with_its_own_exception() -> None:
    fut: Future[int] = Future()
    error = LookupError("from the callback")

    def callback(_: Future[int]) -> int:
        raise error

    child = fut.then(callback)
    fut.set_result(1)
    assert fut.value() == 1
    with pytest.raises(LookupError) as raised:
        child.wait()
    assert raised.value is error


def test_then_does_not_propagate_a_parent_error_unless_the_callback_reads_it() -> None:
    parent: Future[int] = Future()
    ignoring = parent.then(lambda f: "fine")
    reading = parent.then(lambda f: f.value())
    parent.set_exception(ValueError("parent failed"))
    assert ignoring.wait() == "fine"
    with pytest.raises(ValueError, match="parent failed"):
        reading.wait()


def test_a_5000_link_then_chain_completes_without_recursion() -> None:
    head: Future[int] = Future()
    tail = head
    for _ in range(5000):
        tail = tail.then(lambda f: f.value() + 1)
    head.set_result(0)
    assert tail.wait(timeout=10) == 5000


def test_a_callback_blocking_on_a_downstream_future_of_its_chain_does_not_deadlock() -> None:
    head: Future[int] = Future()
    middle = head.then(lambda f: f.value() + 1)
    tail = middle.then(lambda f: f.value() + 1)
    seen: list[int] = []
    # This callback runs while head's callbacks are dispatched; tail only completes once
    # middle's callbacks run, which are queued behind it in the same thread.
    head.add_done_callback(lambda f: seen.append(tail.wait(timeout=5)))
    run_in_thread(lambda: head.set_result(0), timeout=10)
    assert seen == [2]


def test_cancel_a_pending_future() -> None:
    fut: Future[int] = Future()
    notified: list[bool] = []
    fut.add_done_callback(lambda f: notified.append(f.cancelled()))
    assert fut.cancel() is True
    assert fut.cancelled() and fut.done()
    assert notified == [True]
    with pytest.raises(anyfork.CancelledError):
        fut.wait()
    with pytest.raises(anyfork.CancelledError):
        fut.value()


def test_cancel_a_done_future_returns_false() -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    assert fut.cancel() is False
    assert not fut.cancelled()
    assert fut.value() == 1


def test_cancelled_error_is_not_a_backend_cancellation() -> None:
    import asyncio

    assert issubclass(anyfork.CancelledError, Exception)
    assert not issubclass(anyfork.CancelledError, asyncio.CancelledError)


def test_blocking_wait_times_out_with_timeout_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TimeoutError):
        fut.wait(timeout=0.05)
    with pytest.raises(ValueError, match="timeout"):
        fut.wait(timeout=-1)


def test_blocking_wait_returns_when_another_thread_completes() -> None:
    fut: Future[str] = Future()
    timer = threading.Timer(0.05, fut.set_result, args=("late",))
    timer.start()
    assert fut.wait(timeout=10) == "late"


def test_an_exception_nobody_retrieved_is_logged_when_collected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fut: Future[int] = Future(name="lonely")
    fut.set_exception(ZeroDivisionError("nobody looked"))
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        del fut
        gc.collect()
    assert logged_within(caplog, "never retrieved")


def test_a_retrieved_exception_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    fut: Future[int] = Future()
    fut.set_exception(ZeroDivisionError())
    with pytest.raises(ZeroDivisionError):
        fut.wait()
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        del fut
        gc.collect()
    assert not caplog.records


def test_pickling_a_future_raises_a_clear_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(fut)


def test_repr_shows_name_and_state() -> None:
    fut: Future[int] = Future(name="job")
    assert repr(fut) == "<anyfork.Future 'job' pending>"
    fut.set_result(1)
    assert repr(fut) == "<anyfork.Future 'job' finished>"


# --- a done callback that raises a BaseException ---------------------------------------


def complete_in_a_thread(fut: Future[int], value: int) -> BaseException | None:
    """Call ``fut.set_result(value)`` in a plain thread; return what it raised, if anything.

    Returned, never re-raised: a KeyboardInterrupt escaping into pytest would end the run.
    """

    def complete() -> BaseException | None:
        try:
            fut.set_result(value)
        except BaseException as exc:
            return exc
        return None

    outcome: BaseException | None = run_in_thread(complete)
    return outcome


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_from_a_done_callback_is_reraised_after_every_other_callback_ran(
    interrupt: type[BaseException],
) -> None:
    fut: Future[int] = Future()
    calls: list[str] = []

    def raising(_: Future[int]) -> None:
        calls.append("raising")
        raise interrupt

    fut.add_done_callback(lambda f: calls.append("before"))
    fut.add_done_callback(raising)
    fut.add_done_callback(lambda f: calls.append("after"))
    raised = complete_in_a_thread(fut, 1)
    assert calls == ["before", "raising", "after"]
    assert isinstance(raised, interrupt)
    assert fut.value() == 1


def test_a_then_child_completes_when_an_earlier_callback_raises_keyboard_interrupt() -> None:
    fut: Future[int] = Future()

    def raising(_: Future[int]) -> None:
        raise KeyboardInterrupt

    fut.add_done_callback(raising)
    child = fut.then(lambda f: f.value() + 1)
    grandchild = child.then(lambda f: f.value() + 1)
    assert isinstance(complete_in_a_thread(fut, 1), KeyboardInterrupt)
    assert child.done() and child.value() == 2
    assert grandchild.done() and grandchild.value() == 3


def test_only_the_first_of_two_interrupts_from_callbacks_is_reraised_and_the_other_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fut: Future[int] = Future()
    first, second = KeyboardInterrupt("first"), SystemExit("second")

    def raise_first(_: Future[int]) -> None:
        raise first

    def raise_second(_: Future[int]) -> None:
        raise second

    fut.add_done_callback(raise_first)
    fut.add_done_callback(raise_second)
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        assert complete_in_a_thread(fut, 1) is first
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [second]


@pytest.mark.parametrize(
    "error",
    [asyncio.CancelledError, GeneratorExit, BaseException],
    ids=lambda e: e.__name__,
)
def test_other_base_exceptions_from_a_done_callback_are_logged_like_exceptions(
    error: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    fut: Future[int] = Future()
    later: list[int] = []

    def raising(_: Future[int]) -> None:
        raise error("from the callback")

    fut.add_done_callback(raising)
    fut.add_done_callback(lambda f: later.append(f.value()))
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        assert complete_in_a_thread(fut, 7) is None
    assert later == [7]
    (record,) = caplog.records
    assert record.exc_info is not None and isinstance(record.exc_info[1], error)


def test_an_interrupt_from_a_callback_added_to_a_done_future_is_raised_at_once() -> None:
    fut: Future[int] = Future()
    fut.set_result(1)

    def raising(_: Future[int]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fut.add_done_callback(raising)


# --- tracebacks: bounded, and no reference cycles -------------------------------------


def traceback_length(error: BaseException) -> int:
    length, entry = 0, error.__traceback__
    while entry is not None:
        length, entry = length + 1, entry.tb_next
    return length


def raised(error: BaseException) -> BaseException:
    """``error`` after being raised and caught here, so it has a traceback of its own."""
    try:
        raise error
    except BaseException as caught:
        return caught


READS = ["value", "Future.wait", "anyfork.wait", "wait_all"]


def read_and_catch(how: str, fut: Future[Any]) -> BaseException:
    """Read ``fut`` the way ``how`` names and return what it raised.

    Like a reader that is done with the future, it keeps no reference to it once it returns:
    its frame stays in the exception's traceback, so whatever it held would stay alive.
    """
    try:
        if how == "value":
            fut.value()
        elif how == "Future.wait":
            fut.wait()
        elif how == "anyfork.wait":
            anyfork.wait(fut)
        else:
            anyfork.wait_all([fut])
    except BaseException as error:
        return error
    finally:
        del fut
    raise AssertionError("the read did not raise")


@pytest.mark.parametrize("read", READS)
def test_reading_a_failed_future_a_thousand_times_does_not_grow_its_traceback(
    read: str,
) -> None:
    fut: Future[int] = Future()
    fut.set_exception(raised(ValueError("boom")))
    once = traceback_length(read_and_catch(read, fut))
    for _ in range(1000):
        error = read_and_catch(read, fut)
    assert traceback_length(error) == once
    # Of the readers' frames, the exception (so the future) keeps only the last one's.
    readers, entry = 0, error.__traceback__
    while entry is not None:
        readers += entry.tb_frame.f_code is read_and_catch.__code__
        entry = entry.tb_next
    assert readers == 1


def test_a_failing_10000_link_then_chain_ends_with_a_bounded_traceback() -> None:
    head: Future[int] = Future()
    tail = head
    for _ in range(10_000):
        tail = tail.then(lambda f: f.value())
    head.set_exception(raised(ValueError("at the head")))
    at_the_tail = traceback_length(read_and_catch("Future.wait", tail))
    at_the_head = traceback_length(read_and_catch("Future.wait", head))
    assert (at_the_tail, at_the_head) == (at_the_head, at_the_head)


def never_retrieved_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return logged_within(caplog, "was never retrieved")


@pytest.mark.parametrize("read", READS)
def test_a_failed_future_that_was_read_is_freed_with_its_last_reference(read: str) -> None:
    with garbage_collector_disabled():
        fut: Future[int] = Future()
        fut.set_exception(raised(ValueError("boom")))
        read_and_catch(read, fut)
        ref = weakref.ref(fut)
        del fut
        freed = ref() is None
    assert freed


def test_a_failed_future_nobody_read_is_logged_and_freed_with_its_last_reference(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with garbage_collector_disabled(), caplog.at_level(logging.ERROR, logger="anyfork"):
        fut: Future[int] = Future()
        fut.set_exception(raised(ValueError("boom")))
        ref = weakref.ref(fut)
        del fut
        freed = ref() is None
    assert freed
    assert never_retrieved_logged(caplog)


@pytest.mark.parametrize("reraises_the_parents_error", [False, True])
def test_a_failed_then_child_nobody_read_is_logged_and_freed_with_its_last_reference(
    reraises_the_parents_error: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with garbage_collector_disabled(), caplog.at_level(logging.ERROR, logger="anyfork"):
        parent: Future[int] = Future()
        if reraises_the_parents_error:
            child = parent.then(lambda f: f.value())
            parent.set_exception(raised(ValueError("parent failed")))
        else:
            child = parent.then(lambda f: 1 // 0)
            parent.set_result(1)
        ref = weakref.ref(child)
        del child
        freed = ref() is None
    assert freed
    assert never_retrieved_logged(caplog)


def test_a_failed_sync_fork_in_a_script_is_logged_and_freed_with_its_last_reference() -> None:
    result = run_script(
        """
        import gc, logging, sys, time, weakref

        import anyfork

        logging.basicConfig(stream=sys.stdout, format="%(message)s")
        gc.disable()

        class Argument:
            pass

        def fail(argument):
            raise ValueError("nobody waits for this")

        argument = Argument()
        fut = anyfork.fork(fail, argument)
        refs = [weakref.ref(fut), weakref.ref(argument)]
        del argument
        while not fut.done():
            time.sleep(0.01)
        del fut
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in refs) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("freed:", [ref() is None for ref in refs])
        """
    )
    assert "was never retrieved" in result.stdout, result.stderr
    assert "freed: [True, True]" in result.stdout, result.stdout + result.stderr


def test_a_failed_then_child_that_collect_all_follows_is_freed_with_its_last_reference(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with garbage_collector_disabled(), caplog.at_level(logging.ERROR, logger="anyfork"):
        parent: Future[int] = Future()
        child = parent.then(lambda f: 1 // 0)
        combined = anyfork.collect_all([parent, child])  # its callback holds the child
        parent.set_result(1)
        refs = [weakref.ref(child), weakref.ref(combined)]
        del child, combined
        freed = [ref() is None for ref in refs]
    assert freed == [True, True]
    assert never_retrieved_logged(caplog)


class Argument:
    """Sets ``freed`` when it is freed."""

    def __init__(self, freed: threading.Event) -> None:
        self.freed = freed

    def __del__(self) -> None:
        self.freed.set()


# Free-threaded CPython (PEP 703) counts references per thread ("biased reference counting"):
# when a thread drops the last reference to an object another thread made, the object is
# queued to its maker, which frees it at its next check (or the garbage collector, which
# merges every thread's queue). So there "let go of" cannot mean "freed at once".
FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


@pytest.mark.parametrize("where", ["script", "thread"])
def test_a_sync_fork_lets_go_of_its_arguments_before_its_future_completes(where: str) -> None:
    # Once the future is done the program may exit; a daemon worker thread that still frees
    # the work's objects then (a torch tensor) can abort the interpreter's finalization.
    freed, registered, called_back = threading.Event(), threading.Event(), threading.Event()
    freed_at_completion: list[bool] = []

    def on_done(fut: Future[bool]) -> None:
        if FREE_THREADED_BUILD:
            # A reference the worker dropped may be queued to the thread that made the
            # argument: the collector frees it now. One the worker still held would keep it.
            gc.collect()
        freed_at_completion.append(freed.is_set())
        called_back.set()

    def start() -> Future[bool]:
        fut = anyfork.fork(lambda argument: registered.wait(10), Argument(freed))
        fut.add_done_callback(on_done)
        registered.set()
        return fut

    fut = start() if where == "script" else run_in_thread(start)
    fut.wait(timeout=10)
    # Waiters may wake before the done callbacks have run (add_done_callback's docs).
    assert called_back.wait(10)
    assert freed_at_completion == [True]


# --- publication order (issue 17, item 23) -----------------------------------------------


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel"])
def test_a_reader_that_sees_the_future_done_sees_its_outcome(outcome: str) -> None:
    # The lock-free readers (done(), wait(), value(), await) read the state first and the
    # outcome after it. Another thread (free-threaded Python, or a thread switch with the
    # GIL) may read at any point while _complete runs: a line tracer stands in for that
    # reader, at every line of the completing code, so every interleaving is tried, each
    # time, deterministically.
    fut: Future[object] = Future()
    payload = object()
    error = ValueError("boom")
    seen: list[str] = []

    def read_now() -> None:
        if not fut.done():
            return
        try:
            got = fut.value()
        except ValueError as exc:
            seen.append("error" if exc is error else f"wrong error {exc!r}")
        except anyfork.CancelledError:
            seen.append("cancelled")
        except BaseException as exc:  # an assertion inside the future, say
            seen.append(f"raised {exc!r}")
        else:
            seen.append("payload" if got is payload else f"wrong value {got!r}")

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_locals.get("self") is fut:
            read_now()
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.endswith(("_future.py", "_state.py")):
            return local
        return None

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        if outcome == "result":
            fut.set_result(payload)
        elif outcome == "exception":
            fut.set_exception(error)
        else:
            fut.cancel()
    finally:
        sys.settrace(before)
    read_now()
    expected = {"result": "payload", "exception": "error", "cancel": "cancelled"}[outcome]
    assert seen and set(seen) == {expected}, seen


# --- cancelling a then() child (issue 17, item 11) ---------------------------------------


def test_a_cancelled_then_child_never_runs_its_callback() -> None:
    parent: Future[int] = Future()
    ran: list[int] = []

    def callback(done: Future[int]) -> int:
        ran.append(done.value())
        raise ValueError("must not run")

    child = parent.then(callback)
    assert child.cancel() is True
    parent.set_result(1)
    assert ran == []
    assert child.cancelled()
    with pytest.raises(anyfork.CancelledError):
        child.value()


def test_cancelling_a_then_child_whose_callback_runs_returns_false() -> None:
    # As with a running sync fork: a callback already running cannot be stopped, so cancel()
    # says so, and the callback's outcome is the child's.
    parent: Future[int] = Future()
    started = threading.Event()
    release = threading.Event()

    def callback(done: Future[int]) -> int:
        started.set()
        assert release.wait(30)
        raise ValueError("kept")

    child = parent.then(callback)
    completing = threading.Thread(target=parent.set_result, args=(1,))
    completing.start()
    try:
        assert started.wait(30)
        assert child.cancel() is False
    finally:
        release.set()
        completing.join(30)
    with pytest.raises(ValueError, match="kept"):
        child.wait(30)


def test_a_then_callback_error_with_nowhere_to_go_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The child was completed by hand while its callback ran: the callback's exception can
    # no longer be stored, so it is logged rather than lost.
    parent: Future[int] = Future()
    child: Future[int] = Future()

    def callback(done: Future[int]) -> int:
        child.set_result(0)
        raise ValueError("nowhere to go")

    child = parent.then(callback)
    with caplog.at_level(logging.ERROR, logger="anyfork"):
        parent.set_result(1)
    assert child.value() == 0
    assert any(
        r.exc_info is not None and "nowhere to go" in str(r.exc_info[1]) for r in caplog.records
    ), caplog.records


# --- reports of unretrieved failures, never inside the collector (issue 17, item a) ------


def _failed_future_in_a_cycle() -> None:
    """Leave a failed future nobody read in a reference cycle: only the collector frees it.
    Its traceback points at a line whose caret anchors Python 3.11+ finds by parsing it."""
    fut: Future[int] = Future(name="in a cycle")
    zero = 0
    try:
        fut.set_result(len("abc") // zero)
    except ZeroDivisionError as exc:
        fut.set_exception(exc)
    holder: list[object] = [fut]
    holder.append(holder)


def test_a_failed_future_collected_in_the_middle_of_ast_parse_breaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The collector runs wherever an allocation triggers it, here while ast.parse builds its
    # nodes. Formatting the report's traceback there parsed source lines inside the outer
    # parse: on 3.11 that raised "SystemError: AST constructor recursion depth mismatch" in
    # the code that was parsing (pytest's assertion rewriting, in the wild). The report is
    # now made by the reporter thread, after the collection.
    import ast

    source = "\n".join(f"def f{i}(a, b):\n    return [a + b * {i} for _ in a]" for i in range(300))
    report = "exception of <anyfork.Future 'in a cycle' failed> was never retrieved"
    old_threshold = gc.get_threshold()
    old_interval = sys.getswitchinterval()
    caplog.set_level(logging.ERROR, logger="anyfork")
    gc.collect()  # no garbage of earlier tests: only this test's failed futures are reported
    try:
        for round in range(1, 11):
            # The free-threaded build counts frees against allocations: freeing the last
            # round's tree left the count thousands below 0, and this round's parse would
            # not reach the threshold. A collection starts the count at 0 again.
            gc.collect()
            gc.disable()
            _failed_future_in_a_cycle()
            # Collect at the first allocations of the parse. The free-threaded build's
            # collector also waits until the young objects number a quarter of the old
            # ones, unless the second threshold is 0 (gc_should_collect in CPython's
            # gc_free_threading.c): without it, nothing collected the cycle within the test.
            gc.set_threshold(1, 0) if FREE_THREADED_BUILD else gc.set_threshold(1)
            # 3.11's parser state is shared by all threads: the reporter formatting while
            # this thread parses would break the parse too (CPython's bug, for any thread
            # that formats a traceback). A long switch interval keeps the reporter out until
            # the parse is over: what is tested is that the collector reports nothing itself.
            sys.setswitchinterval(5)
            gc.enable()
            try:
                ast.parse(source)  # raised SystemError when the report was made in here
            finally:
                sys.setswitchinterval(old_interval)
                gc.set_threshold(*old_threshold)
            # One report per round, made outside the parse (3.11's parser state is shared
            # by all threads, so the rounds must not overlap the reporter's formatting).
            deadline = time.monotonic() + 30
            while sum(report in r.getMessage() for r in caplog.records) < round:
                assert time.monotonic() < deadline, "the report was never made"
                time.sleep(0.01)
    finally:
        sys.setswitchinterval(old_interval)
        gc.set_threshold(*old_threshold)
        gc.enable()


def test_reports_of_unretrieved_failures_are_made_outside_the_collector(
    caplog: pytest.LogCaptureFixture,
) -> None:
    collecting: set[int] = set()

    def note_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting.add(threading.get_ident())
        else:
            collecting.discard(threading.get_ident())

    made_inside: list[bool] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "never retrieved" in record.getMessage():
                made_inside.append(threading.get_ident() in collecting)

    # Earlier tests' garbage (more of it on the free-threaded build, whose collector runs
    # less often) is collected and its reports made before the watch starts.
    gc.collect()
    flush_reports()
    watch = Watch()
    logging.getLogger("anyfork").addHandler(watch)
    gc.callbacks.append(note_collection)
    try:
        gc.disable()
        _failed_future_in_a_cycle()
        gc.enable()
        gc.collect()
        assert logged_within(caplog, "never retrieved")
    finally:
        gc.enable()
        gc.callbacks.remove(note_collection)
        logging.getLogger("anyfork").removeHandler(watch)
    assert made_inside == [False]


def test_reports_queued_at_the_end_of_a_script_are_all_made_before_it_exits() -> None:
    result = run_script(
        """
        import anyfork

        def dropped(number):
            future = anyfork.Future(name=f"dropped {number}")
            future.set_exception(ValueError(number))

        for number in range(50):
            dropped(number)
        kept = anyfork.Future(name="kept until finalization")
        kept.set_exception(ValueError("module global"))
        """
    )
    assert result.returncode == 0, result.stderr
    for number in range(50):
        assert f"<anyfork.Future 'dropped {number}' failed> was never retrieved" in result.stderr
    # Free-threaded 3.13 makes modules immortal (CPython gh-117783): at exit anyfork's
    # module globals are set to None before __main__'s, so this future's finalizer runs with
    # anyfork (and logging) torn down. The flush at exit reports it there instead.
    assert "'kept until finalization' failed> was never retrieved" in result.stderr
    assert result.stderr.count("'kept until finalization' failed> was never retrieved") == 1


def test_failures_stored_in_many_threads_at_once_start_one_reporter_thread() -> None:
    # The first failures of a burst are stored in several threads at once (worker threads,
    # the loop's thread): each saw no reporter thread yet and started one, so a second
    # "anyfork reporter" thread lived for the rest of the process (nox -s stress: one
    # thread over the bound after the settle, in 2 of 8 runs). A slow Thread.start widens
    # the window the race needs, so that every run here would hit it.
    result = run_script(
        """
        import threading, time
        import anyfork

        real_start = threading.Thread.start

        def slow_start(self):
            time.sleep(0.05)
            real_start(self)

        threading.Thread.start = slow_start
        barrier = threading.Barrier(8)
        futures = []

        def fail():
            future = anyfork.Future()
            futures.append(future)
            barrier.wait(timeout=30)
            future.set_exception(ValueError("read below"))

        threads = [threading.Thread(target=fail) for _ in range(8)]
        for thread in threads:
            real_start(thread)
        for thread in threads:
            thread.join(timeout=30)
        for future in futures:  # read: nothing to report at exit
            try:
                future.wait()
            except ValueError:
                pass
        names = [thread.name for thread in threading.enumerate()]
        print(names.count("anyfork reporter"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1"], result.stdout
