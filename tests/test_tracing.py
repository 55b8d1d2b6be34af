"""Tracing: a fork runs in a copy of the context it was forked in, so an OpenTelemetry span
started inside a fork is a child of the span that was current at the ``fork`` call, wherever
the work runs: a task, a worker thread, the script fallback, a fork of a fork, or the waiting
thread itself (work stealing). Logging: every message anyfork logs is listed in the docs
with its level."""

from __future__ import annotations

import ast
import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import opentelemetry.context
import pytest
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import anyfork

from .conftest import run_in_thread

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


class Spans:
    """A tracer of its own (no global provider to set) and the spans it finished."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = provider.get_tracer("tests.test_tracing")

    def named(self, name: str) -> ReadableSpan:
        (span,) = [s for s in self.exporter.get_finished_spans() if s.name == name]
        return span

    def assert_child(self, child: str, parent: str) -> None:
        child_span, parent_span = self.named(child), self.named(parent)
        assert child_span.parent is not None, f"{child} has no parent span"
        assert child_span.parent.span_id == parent_span.context.span_id, (
            f"{child}'s parent is not {parent}"
        )
        assert child_span.context.trace_id == parent_span.context.trace_id


@pytest.fixture
def spans() -> Iterator[Spans]:
    # OpenTelemetry loads its context implementation on first use, through package
    # metadata (file reads); do that here, off the loop, where blocking is allowed.
    opentelemetry.context.get_current()
    recorded = Spans()
    yield recorded
    recorded.exporter.shutdown()


# --- on an event loop, every backend -------------------------------------------------------


@pytest.mark.anyio
async def test_a_span_in_a_coroutine_fork_is_a_child_of_the_forking_span(spans: Spans) -> None:
    async def child() -> None:
        with spans.tracer.start_as_current_span("child"):
            await anyio.sleep(0)

    with spans.tracer.start_as_current_span("parent"):
        future = anyfork.fork(child)
    await future
    spans.assert_child("child", "parent")


@pytest.mark.anyio
async def test_a_span_in_a_sync_fork_in_a_worker_thread_is_a_child(spans: Spans) -> None:
    def child() -> int:
        with spans.tracer.start_as_current_span("child"):
            return threading.get_ident()

    with spans.tracer.start_as_current_span("parent"):
        future = anyfork.fork(child)
    assert await future != threading.get_ident()  # awaited: it ran in a worker thread
    spans.assert_child("child", "parent")


@pytest.mark.anyio
async def test_forks_of_forks_nest_their_spans(spans: Spans) -> None:
    def sync_grandchild() -> None:
        with spans.tracer.start_as_current_span("sync grandchild"):
            pass

    async def async_grandchild() -> None:
        with spans.tracer.start_as_current_span("async grandchild"):
            await anyio.sleep(0)

    def sync_child() -> None:
        with spans.tracer.start_as_current_span("sync child"):
            anyfork.fork(sync_grandchild).wait(timeout=10)

    async def async_child() -> None:
        with spans.tracer.start_as_current_span("async child"):
            await anyfork.fork(async_grandchild)

    with spans.tracer.start_as_current_span("parent"):
        futures = [anyfork.fork(sync_child), anyfork.fork(async_child)]
    for future in futures:
        await future
    spans.assert_child("sync child", "parent")
    spans.assert_child("sync grandchild", "sync child")
    spans.assert_child("async child", "parent")
    spans.assert_child("async grandchild", "async child")


@pytest.mark.anyio
async def test_the_parent_is_the_span_current_at_the_fork_call_not_when_it_runs(
    spans: Spans,
) -> None:
    gate = anyio.Event()

    async def child() -> None:
        await gate.wait()
        with spans.tracer.start_as_current_span("child"):
            pass

    with spans.tracer.start_as_current_span("forking"):
        future = anyfork.fork(child)
    with spans.tracer.start_as_current_span("current when it runs"):
        gate.set()
        await future
    spans.assert_child("child", "forking")


# --- in a script: no event loop ------------------------------------------------------------


def test_spans_in_script_forks_are_children_of_the_forking_span(spans: Spans) -> None:
    def sync_child() -> int:
        with spans.tracer.start_as_current_span("sync child"):
            return threading.get_ident()

    async def async_child() -> None:
        with spans.tracer.start_as_current_span("async child"):
            await anyio.sleep(0)

    def script() -> int:
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # no event loop in this thread
        with spans.tracer.start_as_current_span("parent"):
            sync_future = anyfork.fork(sync_child)
            async_future = anyfork.fork(async_child)  # runs on the background loop
        async_future.wait(timeout=10)
        assert sync_future.wait(timeout=10) != threading.get_ident()  # ran in a worker
        return threading.get_ident()

    assert run_in_thread(script) != threading.get_ident()  # a plain thread, no loop
    spans.assert_child("sync child", "parent")
    spans.assert_child("async child", "parent")


def test_a_fork_made_inside_a_sync_script_fork_is_a_child_of_its_span(spans: Spans) -> None:
    def inner() -> None:
        with spans.tracer.start_as_current_span("inner"):
            pass

    def outer() -> None:
        with spans.tracer.start_as_current_span("outer"):
            anyfork.wait_all([anyfork.fork(inner)], timeout=10)

    def script() -> None:
        with spans.tracer.start_as_current_span("script"):
            future = anyfork.fork(outer)
        future.wait(timeout=10)

    run_in_thread(script)
    spans.assert_child("outer", "script")
    spans.assert_child("inner", "outer")


def test_a_fork_the_waiter_runs_itself_keeps_the_forking_span(spans: Spans) -> None:
    # An untimed wait may run a sync fork that has not started yet in the waiting thread
    # (work stealing); the work still runs in the fork's context, not the waiter's.
    anyfork.configure(worker_threads=1)
    gate = threading.Event()
    blocker = anyfork.fork(gate.wait, 10)  # holds the only worker: the next fork queues

    def child() -> int:
        with spans.tracer.start_as_current_span("child"):
            return threading.get_ident()

    with spans.tracer.start_as_current_span("forking"):
        future = anyfork.fork(child)
    with spans.tracer.start_as_current_span("waiting"):
        assert anyfork.wait(future) == threading.get_ident()  # it ran here, inline
    gate.set()
    blocker.wait(timeout=10)
    spans.assert_child("child", "forking")


# --- logging -------------------------------------------------------------------------------

LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}


def logged_messages() -> list[tuple[str, str, str]]:
    """(file, level, format string) of every ``logger.<level>("...")`` call in src/anyfork."""
    found = []
    for path in sorted((ROOT / "src" / "anyfork").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
            ):
                first = node.args[0]
                assert isinstance(first, ast.Constant), f"{path.name}: a non-literal message"
                found.append((path.name, LEVELS[node.func.attr], str(first.value)))
    return found


def test_every_message_anyfork_logs_is_listed_in_the_docs_with_its_level() -> None:
    page = (ROOT / "docs" / "tracing-and-logging.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    messages = logged_messages()
    assert len(messages) >= 10
    for source, level, message in messages:
        # The logger's name says where a record comes from: the message does not repeat it.
        assert not message.startswith("anyfork"), f"{source}'s message repeats the logger name"
        text = f"`{message}`"
        listed = [row for row in rows if text in row]
        assert listed, f"docs/tracing-and-logging.md does not list {source}'s {text}"
        assert listed[0].startswith(f"| {level} |"), f"{text} is logged at {level}"
