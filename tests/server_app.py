"""The FastAPI app that the end-to-end tests serve with uvicorn and hypercorn.

Its routes exercise what a service relies on: fan-out latency, ``def`` endpoints that fork
blocking calls, cancel-on-disconnect, detached forks drained at shutdown, and isolation
between requests. Settings come from the environment so one module serves every test.
"""

from __future__ import annotations

import os
import threading
import time
from contextvars import ContextVar
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI

import anyfork
import anyfork.fastapi
from anyfork.fastapi import ForkScopeMiddleware, RequestScope

GRACE = float(os.environ.get("TEST_GRACE_PERIOD", "10"))

app = FastAPI(lifespan=partial(anyfork.fastapi.lifespan, grace_period=GRACE))
app.add_middleware(ForkScopeMiddleware, cancel_on_disconnect=True)

stats = {"started": 0, "cancelled": 0, "finished": 0}
user: ContextVar[str | None] = ContextVar("user", default=None)


def blocking(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def sleeping(seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


@app.get("/health")
async def health() -> str:
    return "ok"


def timed_blocking(seconds: float) -> tuple[float, float]:
    started = time.monotonic()
    time.sleep(seconds)
    return started, time.monotonic()


async def timed_sleeping(seconds: float) -> tuple[float, float]:
    started = time.monotonic()
    await anyio.sleep(seconds)
    return started, time.monotonic()


@app.get("/fanout")
async def fanout() -> dict[str, Any]:
    # Each branch reports when it ran (the monotonic clock is shared by every process).
    model = anyfork.fork(timed_blocking, 0.6)  # the slowest branch
    features = anyfork.fork(timed_sleeping, 0.4)
    profile = anyfork.fork(timed_sleeping, 0.2)
    return {"spans": [await model, await features, await profile]}


@app.get("/sync-fanout")
def sync_fanout() -> dict[str, Any]:
    first = anyfork.fork(blocking, 0.2)
    second = anyfork.fork(blocking, 0.2)
    return {"branches": anyfork.wait_all([first, second]), "thread": threading.get_ident()}


@app.get("/slow")
async def slow() -> str:
    async def long_call() -> None:
        stats["started"] += 1
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            stats["cancelled"] += 1
            raise
        stats["finished"] += 1

    await anyfork.fork(long_call)
    return "finished"


# Sync forks stepping until asked to stop, by key: steps done, when (monotonic) the work
# saw the request, and how its future ended.
generations: dict[str, dict[str, Any]] = {}
CHECKS = {"anyfork": anyfork.check_cancelled, "anyio": anyio.from_thread.check_cancelled}


def generate(check: str, key: str) -> None:
    record = generations[key]
    while True:
        try:
            CHECKS[check]()
        except BaseException:
            record["stopped_at"] = time.monotonic()
            raise
        record["steps"] += 1
        time.sleep(0.001)  # a generation step


@app.get("/generate/{check}/{key}")
async def generate_until_the_client_leaves(check: str, key: str) -> str:
    record = generations[key] = {"steps": 0, "stopped_at": None, "outcome": None}
    fut = anyfork.fork(generate, check, key)
    fut.add_done_callback(
        lambda f: record.update(outcome="cancelled" if f.cancelled() else "not cancelled")
    )
    await fut
    return "finished"


@app.get("/generation/{key}")
async def generation(key: str) -> dict[str, Any]:
    return generations.get(key, {})


@app.get("/stats")
async def get_stats() -> dict[str, int]:
    return stats


@app.get("/detach", dependencies=[Depends(anyfork.fastapi.fork_policy("detach"))])
async def detach(seconds: float) -> str:
    async def background() -> None:
        await anyio.sleep(seconds)
        print(f"drained after {seconds}", flush=True)

    anyfork.fork(background)
    return "accepted"


@app.get("/stuck", dependencies=[Depends(anyfork.fastapi.fork_policy("detach"))])
async def stuck() -> str:
    anyfork.fork(anyio.sleep_forever)
    return "accepted"


@app.get("/context/{name}")
async def context(
    name: str, scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]
) -> dict[str, Any]:
    before = user.get()
    user.set(name)

    async def read() -> str | None:
        await anyio.sleep(0.01)
        return user.get()

    return {"before": before, "in_fork": await anyfork.fork(read), "scope": id(scope)}
