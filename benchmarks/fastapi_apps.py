"""The same fan-out endpoint written four ways, for bench_fastapi.py.

``GET /fanout`` awaits three independent I/O calls (5, 3 and 1 ms) and returns their
results. BENCH_VARIANT chooses how: anyfork with zero setup, anyfork with the request-scope
middleware, a plain anyio task group, or asyncio.gather.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import anyio
from fastapi import FastAPI

import anyfork
import anyfork.fastapi

VARIANT = os.environ.get("BENCH_VARIANT", "anyfork")
DELAYS = (0.005, 0.003, 0.001)


async def io_call(seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


if VARIANT == "anyfork-middleware":
    app = FastAPI(lifespan=anyfork.fastapi.lifespan)
    app.add_middleware(anyfork.fastapi.ForkScopeMiddleware)
else:
    app = FastAPI()


@app.get("/fanout")
async def fanout() -> dict[str, Any]:
    if VARIANT.startswith("anyfork"):
        futures = [anyfork.fork(io_call, delay) for delay in DELAYS]
        return {"results": [await future for future in futures]}
    if VARIANT == "anyio-task-group":
        results: list[float] = [0.0] * len(DELAYS)

        async def run(index: int, delay: float) -> None:
            results[index] = await io_call(delay)

        async with anyio.create_task_group() as tg:
            for index, delay in enumerate(DELAYS):
                tg.start_soon(run, index, delay)
        return {"results": results}
    if VARIANT == "asyncio-gather":
        return {"results": list(await asyncio.gather(*(io_call(d) for d in DELAYS)))}
    raise RuntimeError(f"unknown BENCH_VARIANT {VARIANT!r}")
