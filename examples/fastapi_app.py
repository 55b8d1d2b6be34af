"""A FastAPI service that fans out a model call and I/O with anyfork.

Serve it with ``uvicorn examples.fastapi_app:app`` and try
``curl localhost:8000/recommend/7``. ``python examples/fastapi_app.py`` runs a short demo:
it serves the app with uvicorn on a free local port and calls it with httpx.

``/recommend/{user_id}`` forks an async feature fetch and a blocking model call (a sync
callable: it runs in a worker thread, never on the event loop), awaits them, and forks a
fire-and-forget audit write. The request-scope middleware joins that write before the
request ends (the client already has its response); ``/recommend-sync/{user_id}`` does the
same from a ``def`` endpoint; ``/events`` detaches its write to the app scope, which the
lifespan drains at shutdown.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException

import anyfork
import anyfork.fastapi
from anyfork.fastapi import ForkScopeMiddleware, RequestScope

logger = logging.getLogger("fastapi_app")


class RankingModel:
    """Stands in for an ``nn.Module`` or a blocking client: a sync callable object."""

    def __call__(self, features: dict[str, float]) -> list[str]:
        time.sleep(0.05)  # blocking inference: runs in a worker thread
        ranked = sorted(features, key=features.__getitem__, reverse=True)
        return [f"item-{name}" for name in ranked]


model = RankingModel()
audit_log: list[str] = []


async def fetch_features(user_id: int) -> dict[str, float]:
    await anyio.sleep(0.05)  # a feature store over the network
    if user_id <= 0:
        raise HTTPException(status_code=404, detail=f"no user {user_id}")
    return {"books": user_id * 0.5, "films": 2.0, "games": 1.0}


async def write_audit(event: str) -> None:
    await anyio.sleep(0.02)  # an append to an audit store
    audit_log.append(event)


app = FastAPI(lifespan=anyfork.fastapi.lifespan)
app.add_middleware(ForkScopeMiddleware, policy="join", cancel_on_disconnect=True)


@app.get("/recommend/{user_id}")
async def recommend(user_id: int) -> dict[str, Any]:
    features = anyfork.fork(fetch_features, user_id)  # a task on the server's loop
    ranked = anyfork.fork(model, await features)  # a worker thread
    anyfork.fork(write_audit, f"recommended for {user_id}")  # joined at request end
    return {"user": user_id, "items": await ranked}


@app.get("/recommend-sync/{user_id}")
def recommend_sync(user_id: int) -> dict[str, Any]:
    # A def endpoint runs in a worker thread: fork hops onto the server's loop, and wait
    # blocks this thread only.
    features = anyfork.fork(fetch_features, user_id)
    ranked = anyfork.fork(model, anyfork.wait(features))
    anyfork.fork(write_audit, f"recommended for {user_id} (sync)")
    return {"user": user_id, "items": anyfork.wait(ranked)}


@app.post("/events", dependencies=[Depends(anyfork.fastapi.fork_policy("detach"))])
async def events(
    name: str, scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]
) -> dict[str, str]:
    anyfork.fork(write_audit, f"event {name}")  # outlives the request; drained at shutdown
    return {"accepted": name, "policy": scope.policy}


def demo() -> None:
    """Serve the app with uvicorn on a free local port, call it, and shut it down."""
    import socket
    import threading

    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning")
    config.load()  # import and set up here, not on the server's event loop
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped before it started: see its error above")
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as client:
            print(client.get("/recommend/7").json())
            print(client.get("/recommend-sync/3").json())
            missing = client.get("/recommend/0")
            print(missing.status_code, missing.json())
            print(client.post("/events", params={"name": "signup"}).json())
    finally:
        server.should_exit = True  # graceful: the lifespan drains detached forks
        thread.join(30)
    print(sorted(audit_log))


if __name__ == "__main__":
    demo()
