"""An async service fanning out mixed work, on asyncio and on trio.

Run it with ``python examples/async_app.py``. ``handle_request`` forks a blocking model call
(a worker thread, off the event loop), two async lookups (tasks) and a fire-and-forget audit
write, then awaits what it needs. The structured scope guarantees the audit write finishes.
"""

from __future__ import annotations

import time

import anyio

import anyfork


class SentimentModel:
    """Stands in for an ``nn.Module`` or any blocking client: a sync callable object."""

    def __call__(self, text: str) -> float:
        time.sleep(0.2)  # blocking inference: runs in a worker thread
        return min(1.0, len(text) / 40)


async def fetch_profile(user_id: int) -> dict[str, object]:
    await anyio.sleep(0.2)
    return {"id": user_id, "name": f"user-{user_id}"}


async def fetch_history(user_id: int, limit: int = 3) -> list[str]:
    await anyio.sleep(0.15)
    return [f"order-{user_id}-{n}" for n in range(limit)]


async def write_audit_log(event: str) -> None:
    await anyio.sleep(0.05)
    print(f"  audit: {event}")


model = SentimentModel()


async def handle_request(user_id: int, text: str) -> dict[str, object]:
    async with anyfork.scope():
        score = anyfork.fork(model, text)
        profile = anyfork.fork(fetch_profile, user_id)
        history = anyfork.fork(fetch_history, user_id, limit=2)
        anyfork.fork(write_audit_log, f"scored request of user {user_id}")
        return {
            "profile": await profile,
            "history": await history,
            "score": await score,
        }


async def main() -> None:
    started = time.perf_counter()
    response = await handle_request(7, "anyfork makes fan-out simple")
    elapsed = time.perf_counter() - started
    print(f"  {response}")
    print(f"  took {elapsed:.2f}s; the branches alone add up to 0.55s")


if __name__ == "__main__":
    for backend in ("asyncio", "trio"):
        print(f"{backend}:")
        anyio.run(main, backend=backend)
