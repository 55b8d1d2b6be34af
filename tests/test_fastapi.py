"""anyfork in FastAPI apps, in process: httpx's ASGITransport and asgi-lifespan.

Every test runs on asyncio (debug), uvloop and trio.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Annotated, Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

# Not installed on free-threaded Python (no free-threaded wheel): see noxfile.py.
pytest.importorskip("fastapi")

from fastapi import Depends, FastAPI, HTTPException

import anyfork
import anyfork.fastapi
from anyfork.fastapi import ForkScopeMiddleware, RequestScope

from .conftest import run_script

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@asynccontextmanager
async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=20) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


# --- zero setup -------------------------------------------------------------------------


async def fetch_features(user: int) -> dict[str, int]:
    await anyio.sleep(0.01)
    return {"user": user, "clicks": 3}


def model(features: dict[str, int]) -> float:
    time.sleep(0.01)  # a blocking call: fine, it runs in a worker thread
    return features["clicks"] * 0.5


def blocking_io(name: str) -> str:
    time.sleep(0.01)
    return name


async def test_zero_setup_async_handler_forks_coroutines_and_blocking_calls() -> None:
    app = FastAPI()

    @app.get("/score/{user}")
    async def score(user: int) -> dict[str, Any]:
        features = anyfork.fork(fetch_features, user)
        io = anyfork.fork(blocking_io, "db")
        value = anyfork.fork(model, await features)
        return {"score": await value, "io": await io, "thread": threading.get_ident()}

    async with client_for(app) as client:
        response = await client.get("/score/7")
    assert response.status_code == 200
    assert response.json()["score"] == 1.5
    assert response.json()["io"] == "db"


async def test_zero_setup_def_handler_forks_onto_the_servers_loop_and_waits() -> None:
    app = FastAPI()
    seen: dict[str, Any] = {}

    @app.get("/sync")
    def sync_handler() -> dict[str, Any]:
        seen["handler_thread"] = threading.get_ident()
        features = anyfork.fork(fetch_features, 1)  # a coroutine: a task on the loop
        io = anyfork.fork(blocking_io, "cache")
        return {"features": anyfork.wait(features), "io": anyfork.wait(io)}

    async with client_for(app) as client:
        response = await client.get("/sync")
    assert response.status_code == 200, response.text
    assert response.json() == {"features": {"user": 1, "clicks": 3}, "io": "cache"}
    assert seen["handler_thread"] != threading.get_ident()


@pytest.mark.parametrize("middleware", [False, True], ids=["bare", "middleware"])
async def test_an_http_exception_raised_in_a_fork_keeps_its_status_code(middleware: bool) -> None:
    app = FastAPI()
    if middleware:
        app.add_middleware(ForkScopeMiddleware)

    async def lookup(item: int) -> str:
        raise HTTPException(status_code=404, detail=f"no item {item}")

    def lookup_sync(item: int) -> str:
        raise HTTPException(status_code=409, detail=f"item {item} is locked")

    @app.get("/items/{item}")
    async def get_item(item: int) -> str:
        return await anyfork.fork(lookup, item)

    @app.get("/locked/{item}")
    def get_locked(item: int) -> str:
        return anyfork.wait(anyfork.fork(lookup_sync, item))

    async with client_for(app) as client:
        missing = await client.get("/items/3")
        locked = await client.get("/locked/4")
    assert (missing.status_code, missing.json()) == (404, {"detail": "no item 3"})
    assert (locked.status_code, locked.json()) == (409, {"detail": "item 4 is locked"})


# --- per-request scopes -------------------------------------------------------------------


def app_with_scopes(**middleware: Any) -> FastAPI:
    app = FastAPI(lifespan=anyfork.fastapi.lifespan)
    app.add_middleware(ForkScopeMiddleware, **middleware)
    return app


async def test_join_policy_finishes_fire_and_forget_forks_before_the_request_ends() -> None:
    app = app_with_scopes()
    audit: list[str] = []

    async def write_audit(event: str) -> None:
        await anyio.sleep(0.05)
        audit.append(event)

    def write_audit_sync(event: str) -> None:
        time.sleep(0.05)
        audit.append(event)

    @app.get("/view")
    async def view() -> str:
        anyfork.fork(write_audit, "async")
        return "ok"

    @app.get("/view-sync")
    def view_sync() -> str:
        anyfork.fork(write_audit_sync, "sync")
        return "ok"

    async with client_for(app) as client:
        assert (await client.get("/view")).status_code == 200
        assert audit == ["async"]
        assert (await client.get("/view-sync")).status_code == 200
        assert audit == ["async", "sync"]


async def test_cancel_policy_cancels_the_requests_pending_forks_at_its_end() -> None:
    app = app_with_scopes(policy="cancel")
    forks: list[anyfork.Future[None]] = []

    @app.get("/")
    async def handler() -> str:
        forks.append(anyfork.fork(anyio.sleep_forever))
        return "ok"

    async with client_for(app) as client:
        with anyio.fail_after(10):
            assert (await client.get("/")).status_code == 200
    assert forks[0].cancelled()


async def test_detach_policy_hands_forks_to_the_app_scope_which_drains_them() -> None:
    app = app_with_scopes(policy="detach")
    done = anyio.Event()
    finished: list[str] = []

    async def long_write() -> None:
        await done.wait()
        finished.append("written")

    app_scopes: list[anyfork.fastapi.AppScope | None] = []

    @app.get("/")
    async def handler(scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]):
        fut = anyfork.fork(long_write)
        assert fut not in [pending.future for pending in scope.pending]
        app_scopes.append(scope.app_scope)
        return "ok"

    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
        assert finished == []  # the request ended without waiting for it
        [app_scope] = app_scopes
        assert app_scope is not None
        assert len(app_scope.pending) == 1
        done.set()  # the shutdown below drains it
    assert finished == ["written"]


async def test_a_route_chooses_its_own_policy_with_a_dependency() -> None:
    app = app_with_scopes(policy="join")
    forks: dict[str, anyfork.Future[None]] = {}

    @app.get("/cancel", dependencies=[Depends(anyfork.fastapi.fork_policy("cancel"))])
    async def cancelling() -> str:
        forks["cancel"] = anyfork.fork(anyio.sleep_forever)
        return "ok"

    @app.get("/join")
    async def joining() -> str:
        forks["join"] = anyfork.fork(anyio.sleep, 0.01)
        return "ok"

    async with client_for(app) as client:
        with anyio.fail_after(10):
            assert (await client.get("/cancel")).status_code == 200
            assert (await client.get("/join")).status_code == 200
    assert forks["cancel"].cancelled()
    assert forks["join"].done() and not forks["join"].cancelled()


async def test_shutdown_cancels_detached_forks_that_outlast_the_grace_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI(lifespan=lambda app: anyfork.fastapi.lifespan(app, grace_period=0.2))
    app.add_middleware(ForkScopeMiddleware, policy="detach")
    forks: list[anyfork.Future[None]] = []

    @app.get("/")
    async def handler() -> str:
        forks.append(anyfork.fork(anyio.sleep_forever))
        return "ok"

    started = time.monotonic()
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
    elapsed = time.monotonic() - started
    assert forks[0].cancelled()
    assert elapsed < 10
    assert "did not finish within the shutdown grace period of 0.2 seconds" in caplog.text
    assert "sleep_forever" in caplog.text


async def test_forks_of_a_def_endpoint_and_of_forks_belong_to_the_request_scope() -> None:
    app = app_with_scopes()
    seen: dict[str, Any] = {}

    async def inner() -> None:
        await anyio.sleep(0.05)
        seen["inner_done"] = True

    async def outer() -> None:
        anyfork.fork(inner)  # a fork of a fork, never awaited

    @app.get("/")
    def handler(scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]) -> str:
        seen["scope"] = scope
        seen["current"] = anyfork.fastapi.current_request_scope()
        anyfork.fork(outer)
        return "ok"

    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
        assert seen["inner_done"] is True  # joined before the request ended
    assert seen["scope"] is seen["current"]
    assert isinstance(seen["scope"], RequestScope)
    assert seen["scope"].label == "GET /"


async def test_an_unretrieved_failure_is_logged_with_the_request_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_with_scopes()

    async def fails() -> None:
        raise ValueError("audit store down")

    @app.get("/orders/{order}")
    async def handler(order: int) -> str:
        anyfork.fork(fails)
        return "ok"

    with caplog.at_level(logging.ERROR, logger="anyfork"):
        async with client_for(app) as client:
            response = await client.get("/orders/5")
    assert response.status_code == 200
    assert "a fork of request GET /orders/5 failed and nobody retrieved the error" in caplog.text
    assert "audit store down" in caplog.text


async def test_nothing_leaks_between_requests() -> None:
    app = app_with_scopes()
    user: ContextVar[str | None] = ContextVar("user", default=None)
    scopes: list[RequestScope] = []

    async def read_user() -> str | None:
        return user.get()

    @app.get("/{name}")
    async def handler(
        name: str, scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]
    ) -> dict[str, Any]:
        before = user.get()
        user.set(name)
        scopes.append(scope)
        return {"before": before, "in_fork": await anyfork.fork(read_user)}

    async with client_for(app) as client:
        # httpx's ASGITransport runs each request in the caller's context, so run each
        # in a task of its own, as a server does.
        responses: list[Any] = [None] * 5

        async def call(i: int) -> None:
            responses[i] = await client.get(f"/user{i}")

        for i in range(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, i)
    for i, response in enumerate(responses):
        assert response.json() == {"before": None, "in_fork": f"user{i}"}
    assert len({id(scope) for scope in scopes}) == 5
    assert anyfork.fastapi.current_request_scope() is None


async def test_concurrent_requests_each_join_only_their_own_forks() -> None:
    app = app_with_scopes()
    release = {name: anyio.Event() for name in ("a", "b")}
    finished: list[str] = []

    async def work(name: str) -> None:
        await release[name].wait()
        finished.append(name)

    @app.get("/{name}")
    async def handler(name: str) -> str:
        anyfork.fork(work, name)
        return name

    async with client_for(app) as client:
        results: dict[str, int] = {}

        async def call(name: str) -> None:
            results[name] = (await client.get(f"/{name}")).status_code

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a")
                tg.start_soon(call, "b")
                await anyio.sleep(0.05)
                release["b"].set()
                while "b" not in results:
                    await anyio.sleep(0.01)
                assert "a" not in results  # b's end did not wait for a's fork
                release["a"].set()
    assert finished == ["b", "a"]


async def test_request_scope_without_the_middleware_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"app.add_middleware\(anyfork.fastapi.ForkScope"):
        await anyfork.fastapi.request_scope()

    app = FastAPI()

    @app.get("/")
    async def handler(scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]):
        return "unreachable"

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).status_code == 500


# --- disconnects ---------------------------------------------------------------------------

# httpx's ASGITransport iterates the request body with an async generator that it never
# closes; when the disconnect watch is cancelled mid-iteration, trio reports that generator.
httpx_body_generator = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.ByteStream.__aiter__':ResourceWarning"
)


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
async def test_a_client_disconnect_cancels_pending_forks_when_enabled(enabled: bool) -> None:
    app = FastAPI()
    app.add_middleware(ForkScopeMiddleware, policy="cancel", cancel_on_disconnect=enabled)
    forked = anyio.Event()
    outcome: dict[str, Any] = {}

    @app.get("/slow")
    async def slow() -> str:
        fut = anyfork.fork(anyio.sleep, 0.5)
        forked.set()
        try:
            await fut
            outcome["fork"] = "finished"
        except anyfork.CancelledError:
            outcome["fork"] = "cancelled"
        return "done"

    disconnect = anyio.Event()
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/slow",
        "raw_path": b"/slow",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("test", 1234),
    }
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await forked.wait()
            disconnect.set()
    assert outcome["fork"] == ("cancelled" if enabled else "finished")
    assert sent[0]["status"] == 200


@httpx_body_generator
async def test_a_disconnect_after_the_response_cancels_nothing() -> None:
    app = app_with_scopes(cancel_on_disconnect=True)
    forks: list[anyfork.Future[None]] = []

    @app.get("/")
    async def handler() -> str:
        forks.append(anyfork.fork(anyio.sleep, 0.1))  # fire and forget, joined
        return "ok"

    async with client_for(app) as client:
        with anyio.fail_after(10):
            assert (await client.get("/")).status_code == 200
    assert forks[0].done() and not forks[0].cancelled()


@httpx_body_generator
async def test_a_request_body_still_reaches_the_endpoint_through_the_disconnect_watch() -> None:
    app = app_with_scopes(cancel_on_disconnect=True)

    @app.post("/echo")
    async def echo(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    body = {"items": list(range(5000))}
    async with client_for(app) as client:
        response = await client.post("/echo", json=body)
    assert response.json() == body


# --- bad input -------------------------------------------------------------------------------


def test_bad_settings_fail_at_the_call() -> None:
    app = FastAPI()
    with pytest.raises(ValueError, match=r"policy must be one of 'join', 'cancel', 'detach'"):
        ForkScopeMiddleware(app, policy="later")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cancel_on_disconnect must be True or False"):
        ForkScopeMiddleware(app, cancel_on_disconnect="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy must be one of"):
        anyfork.fastapi.fork_policy("never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace_period must be a number of seconds >= 0, got -1"):
        anyfork.fastapi.AppScope(grace_period=-1)
    with pytest.raises(TypeError, match="grace_period must be a number of seconds"):
        anyfork.fastapi.AppScope(grace_period="10")  # type: ignore[arg-type]


def test_importing_the_integration_without_fastapi_names_the_extra() -> None:
    result = run_script(
        """
        import sys
        sys.modules["starlette"] = None  # as if FastAPI (and Starlette) were not installed
        try:
            import anyfork.fastapi
        except ImportError as exc:
            print(exc)
        """
    )
    assert "pip install 'anyfork[fastapi]'" in result.stdout, result.stderr


def test_importing_the_integration_loads_anyios_backend_off_the_loop() -> None:
    # Otherwise anyio imports it at the first lifespan or request, blocking the loop for
    # tens of milliseconds (asyncio's debug mode reports it).
    result = run_script(
        """
        import sys
        import anyfork.fastapi
        print("anyio._backends._asyncio" in sys.modules)
        """
    )
    assert result.stdout == "True\n", result.stderr


async def test_an_unretrieved_failure_of_a_detached_fork_is_logged_while_the_app_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The app scope lives as long as the app: it used to hold every failed fork, frames
    # and all, and log the failures only at shutdown, hours later.
    app = app_with_scopes(policy="detach")

    async def fails() -> None:
        raise ValueError("late write failed")

    @app.get("/")
    async def handler() -> str:
        anyfork.fork(fails)
        return "ok"

    with caplog.at_level(logging.ERROR, logger="anyfork"):
        async with client_for(app) as client:
            assert (await client.get("/")).status_code == 200
            with anyio.fail_after(20):
                while "late write failed" not in caplog.text:
                    await anyio.sleep(0.01)
            assert "<locals>.fails' failed> was never retrieved" in caplog.text


async def test_a_detached_failure_still_held_at_shutdown_is_logged_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_with_scopes(policy="detach")
    held: list[anyfork.Future[None]] = []

    async def fails() -> None:
        raise ValueError("late write failed")

    @app.get("/")
    async def handler() -> str:
        held.append(anyfork.fork(fails))
        return "ok"

    with caplog.at_level(logging.ERROR, logger="anyfork"):
        async with client_for(app) as client:
            assert (await client.get("/")).status_code == 200
    assert "a fork of the app scope failed and nobody retrieved the error" in caplog.text
    assert "late write failed" in caplog.text


async def test_the_app_scope_holds_no_failure_that_was_retrieved() -> None:
    app = app_with_scopes(policy="detach")
    refs: list[weakref.ref[anyfork.Future[None]]] = []

    async def fails() -> None:
        raise ValueError("handled")

    @app.get("/")
    async def handler() -> str:
        future = anyfork.fork(fails)
        refs.append(weakref.ref(future))
        with contextlib.suppress(ValueError):
            await future
        return "ok"

    async with client_for(app) as client:
        for _ in range(50):
            assert (await client.get("/")).status_code == 200
        gc.collect()
        assert all(ref() is None for ref in refs)
