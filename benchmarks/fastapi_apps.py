"""The fan-out endpoints that bench_fastapi.py loads, each written the ways it compares.

Two apps serve the same routes: ``app`` with no setup, and ``scoped_app`` with anyfork's
:class:`~anyfork.fastapi.ForkScopeMiddleware` and lifespan. Every route does the same work and
returns the same JSON, ``{"results": [...]}``, with one value per call:

- ``/io/...``: three awaited I/O calls (``anyio.sleep(0.001)``), side by side, with
  ``anyfork.fork`` (``/io/anyfork``), an anyio task group (``/io/task-group``) or
  ``asyncio.gather`` (``/io/gather``);
- ``/blocking/...``: three blocking calls (``time.sleep(0.001)`` in plain functions), side
  by side in worker threads, with ``anyfork.fork`` (``/blocking/anyfork``),
  ``asyncio.to_thread`` (``/blocking/to-thread``) or ``anyio.to_thread.run_sync``
  (``/blocking/anyio-to-thread``).

Serve one with ``uvicorn fastapi_apps:app --app-dir benchmarks``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, FastAPI

import anyfork
import anyfork.fastapi

CALLS = 3
SECONDS = 0.001


async def io_call(seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


def blocking_call(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


router = APIRouter()


@router.get("/io/anyfork")
async def io_anyfork() -> dict[str, Any]:
    futures = [anyfork.fork(io_call, SECONDS) for _ in range(CALLS)]
    return {"results": [await future for future in futures]}


@router.get("/io/task-group")
async def io_task_group() -> dict[str, Any]:
    async with anyio.create_task_group() as tg:
        handles = [tg.start_soon(io_call, SECONDS) for _ in range(CALLS)]
    return {"results": [await handle for handle in handles]}


@router.get("/io/gather")
async def io_gather() -> dict[str, Any]:
    return {"results": await asyncio.gather(*(io_call(SECONDS) for _ in range(CALLS)))}


@router.get("/blocking/anyfork")
async def blocking_anyfork() -> dict[str, Any]:
    futures = [anyfork.fork(blocking_call, SECONDS) for _ in range(CALLS)]
    return {"results": [await future for future in futures]}


@router.get("/blocking/to-thread")
async def blocking_to_thread() -> dict[str, Any]:
    calls = (asyncio.to_thread(blocking_call, SECONDS) for _ in range(CALLS))
    return {"results": await asyncio.gather(*calls)}


@router.get("/blocking/anyio-to-thread")
async def blocking_anyio_to_thread() -> dict[str, Any]:
    async with anyio.create_task_group() as tg:
        handles = [
            tg.start_soon(anyio.to_thread.run_sync, blocking_call, SECONDS) for _ in range(CALLS)
        ]
    return {"results": [await handle for handle in handles]}


app = FastAPI()
app.include_router(router)

scoped_app = FastAPI(lifespan=anyfork.fastapi.lifespan)
scoped_app.add_middleware(anyfork.fastapi.ForkScopeMiddleware)
scoped_app.include_router(router)
