from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop does not build on Windows
    uvloop = None

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param(
        ("asyncio", {"loop_factory": uvloop.new_event_loop if uvloop else None}),
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any blocking call made on a running asyncio event loop, by anyfork or a test.

    blockbuster sees only asyncio loops (uvloop included); trio tests rely on the same
    code paths being exercised on asyncio.
    """
    with blockbuster_ctx(["anyfork", "tests"]) as detector:
        yield detector


@pytest.fixture(autouse=True)
def _restore_config() -> Iterator[None]:
    import anyfork

    before = anyfork.configure()
    yield
    anyfork.configure(
        eager=before.eager,
        worker_threads=before.worker_threads,
        exit_timeout=before.exit_timeout,
    )


def run_in_thread(func: Callable[[], Any], timeout: float = 30) -> Any:
    """Run func in a plain (non-anyio) thread and return its result or raise its error."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "thread did not finish in time"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_script(
    source: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python program in a fresh interpreter and return what it printed."""
    import os

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
