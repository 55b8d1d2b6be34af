"""FastAPI and ASGI integration: an app-wide scope, a scope per request, and a dependency.

``fork`` needs no setup in FastAPI: it works in ``async def`` handlers (forks join the
loop's ambient group) and in ``def`` handlers (they run in anyio worker threads, so forks
hop onto the server's loop and ``wait`` blocks only that worker thread). This module adds
structure on top, with Starlette's own mechanisms:

- :func:`lifespan` owns an app-wide scope; at shutdown it drains forks for a bounded
  grace period, then cancels the rest;
- :class:`ForkScopeMiddleware`, a pure ASGI middleware, opens a :class:`RequestScope` for
  each HTTP request; at its end the request's unfinished forks are joined, cancelled or
  detached to the app scope (the :data:`Policy`), per app or per route (:func:`fork_policy`),
  and optionally cancelled when the client disconnects;
- :func:`request_scope`, a dependency that returns the request's scope object.

Install with ``pip install "anyfork[fastapi]"``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Literal, get_args

import anyio

try:
    from starlette.types import ASGIApp, Message, Receive, Send
    from starlette.types import Scope as ASGIScope
except ImportError as exc:  # tests/test_fastapi.py hides Starlette to check this message
    raise ImportError(
        "anyfork.fastapi needs FastAPI (and the Starlette it brings): "
        "pip install 'anyfork[fastapi]'"
    ) from exc

from . import _loops
from ._errors import CancelledError
from ._scope import Scope
from ._validate import check_flag, check_seconds

__all__ = [
    "AppScope",
    "ForkScopeMiddleware",
    "Policy",
    "RequestScope",
    "current_request_scope",
    "fork_policy",
    "lifespan",
    "request_scope",
]

logger = logging.getLogger("anyfork")

Policy = Literal["join", "cancel", "detach"]
"""What happens to a request's unfinished forks when the request ends.

- ``"join"`` (the default): the request's ASGI call returns only after they finish. The
  response has been sent by then, so the client does not wait; the server's worker does.
- ``"cancel"``: pending forks are cancelled (a sync fork already running in its thread is
  still waited for, as threads cannot be interrupted).
- ``"detach"``: forks are made in the app scope of :func:`lifespan` (or, without it, the
  loop's ambient group) and outlive the request; shutdown drains them.
"""

_POLICIES: tuple[str, ...] = get_args(Policy)

# Servers import the app before they start their loop: load anyio's backends then (trio's
# too, if the server imported it first), not on the loop at the first lifespan or request.
_loops.load_backends()

DEFAULT_GRACE_PERIOD = 10.0

# App -> its app scope, while the lifespan runs. Keyed by the app object, which the
# middleware finds in the ASGI scope ("app"); weak, so tests creating many apps leak none.
_app_scopes: weakref.WeakKeyDictionary[object, AppScope] = weakref.WeakKeyDictionary()

_current_request: ContextVar[RequestScope | None] = ContextVar(
    "anyfork_current_request", default=None
)


def _check_policy(policy: object) -> Policy:
    if policy not in _POLICIES:
        raise ValueError(
            f"policy must be one of {', '.join(repr(p) for p in _POLICIES)}, got {policy!r}"
        )
    return policy  # type: ignore[return-value]


def _check_grace(grace_period: object) -> float:
    seconds = check_seconds(grace_period, "grace_period")
    assert seconds is not None  # None is not allowed
    return float(seconds)


class _LoggingScope(Scope):
    """A scope that logs failures nobody retrieved instead of raising them at exit."""

    def _owner(self) -> str:
        raise NotImplementedError

    def report_unretrieved(self, failures: list[BaseException], exc: BaseException | None) -> None:
        for failure in failures:
            logger.error(
                "a fork of %s failed and nobody retrieved the error",
                self._owner(),
                exc_info=failure,
            )


class AppScope(_LoggingScope):
    """The app-wide scope opened by :func:`lifespan`.

    Forks detached from requests (``policy="detach"``) and forks made while the lifespan
    starts up belong to it. At shutdown it waits up to ``grace_period`` seconds for them,
    then cancels those still pending. A failure nobody retrieved is logged at ERROR rather
    than raised, so that it cannot turn a clean shutdown into a failed one, and without
    waiting for the shutdown: once the failed fork's future is freed (``exception ... was
    never retrieved``), or at shutdown if something still holds it then.
    """

    # It lives as long as the app: a detached fork's failure nobody retrieved is reported
    # when its future is freed (usually right after it fails), not hours later at shutdown.
    holds_failures = False

    def __init__(self, *, grace_period: float = DEFAULT_GRACE_PERIOD) -> None:
        super().__init__()
        self.grace_period = _check_grace(grace_period)

    def __repr__(self) -> str:
        return f"<anyfork.fastapi.AppScope grace_period={self.grace_period}>{super().__repr__()}"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unfinished = await self.drain(self.grace_period)
        if unfinished:
            logger.warning(
                "%d fork(s) did not finish within the shutdown grace period of "
                "%s seconds; cancelling them (sync forks already running in a thread are "
                "waited for): %s",
                len(unfinished),
                self.grace_period,
                ", ".join(repr(future) for future in unfinished),
            )
            self.cancel_pending = True
        await super().__aexit__(exc_type, exc, traceback)

    def _owner(self) -> str:
        return "the app scope"


class RequestScope(_LoggingScope):
    """The scope of one HTTP request, opened by :class:`ForkScopeMiddleware`.

    Forks made while handling the request — in ``async def`` and ``def`` endpoints, in
    dependencies, and in forks made by those forks — belong to it. What happens to those
    still unfinished when the request ends is its :attr:`policy`; a route may change it
    with :func:`fork_policy` before it forks. A failure nobody retrieved is logged at ERROR
    with the request's method and path (the response has been sent by then).
    """

    def __init__(self, *, policy: Policy = "join", app: object = None, label: str = "") -> None:
        super().__init__()
        self._policy: Policy = _check_policy(policy)
        self.label = label
        self._app = app

    def __repr__(self) -> str:
        return f"<anyfork.fastapi.RequestScope {self.label!r} policy={self._policy!r}>"

    @property
    def policy(self) -> Policy:
        """What happens to this request's unfinished forks when it ends (see :data:`Policy`).

        Set it before forking: forks already made keep the home they were given.
        """
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = _check_policy(policy)

    @property
    def app_scope(self) -> AppScope | None:
        """The app scope that detached forks go to, if the app's lifespan opened one."""
        return None if self._app is None else _app_scopes.get(self._app)

    def forks_go_to(self) -> Scope | None:
        if self._policy != "detach":
            return self
        # Detached: to the app scope while it is open, else to the loop's ambient group.
        return self.app_scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._policy == "cancel":
            self.cancel_pending = True
        await super().__aexit__(exc_type, exc, traceback)

    def _owner(self) -> str:
        return f"request {self.label}"


@asynccontextmanager
async def lifespan(
    app: object, *, grace_period: float = DEFAULT_GRACE_PERIOD
) -> AsyncGenerator[None, None]:
    """Own an app-wide :class:`AppScope` for the life of the app.

    Pass it as the app's lifespan, ``FastAPI(lifespan=anyfork.fastapi.lifespan)``, or enter
    it inside your own lifespan (``async with anyfork.fastapi.lifespan(app, grace_period=5):
    yield``). At shutdown, forks still running get ``grace_period`` seconds to finish; the
    rest are cancelled.

    :param app: the application (what Starlette passes to a lifespan)
    :param grace_period: seconds to wait for unfinished forks at shutdown before cancelling
    """
    app_scope = AppScope(grace_period=grace_period)
    if app in _app_scopes:
        raise RuntimeError("anyfork.fastapi.lifespan() is already running for this app")
    async with app_scope:
        _app_scopes[app] = app_scope
        try:
            yield
        finally:
            _app_scopes.pop(app, None)


class ForkScopeMiddleware:
    """Pure ASGI middleware: one :class:`RequestScope` per HTTP request.

    ``app.add_middleware(ForkScopeMiddleware, policy="join", cancel_on_disconnect=False)``.
    It is not a ``BaseHTTPMiddleware``, so context variables set in it reach the endpoint
    and the scope is found through one. WebSocket and lifespan traffic pass through.

    :param policy: the app's default :data:`Policy` for unfinished forks at request end
    :param cancel_on_disconnect: cancel the request's pending forks when the client
        disconnects before the response is complete (uvicorn does not cancel the handler;
        it keeps running and sees its cancelled forks raise
        :class:`~anyfork.CancelledError`)
    """

    def __init__(
        self, app: ASGIApp, *, policy: Policy = "join", cancel_on_disconnect: bool = False
    ) -> None:
        self.cancel_on_disconnect = check_flag(cancel_on_disconnect, "cancel_on_disconnect")
        self.app = app
        self.policy: Policy = _check_policy(policy)

    async def __call__(self, asgi_scope: ASGIScope, receive: Receive, send: Send) -> None:
        if asgi_scope["type"] != "http":
            await self.app(asgi_scope, receive, send)
            return
        request = RequestScope(
            policy=self.policy,
            app=asgi_scope.get("app"),
            label=f"{asgi_scope.get('method', '')} {asgi_scope.get('path', '')}".strip(),
        )
        token = _current_request.set(request)
        try:
            async with request:
                if self.cancel_on_disconnect:
                    await _call_watching_disconnect(self.app, request, asgi_scope, receive, send)
                else:
                    await self.app(asgi_scope, receive, send)
        finally:
            _current_request.reset(token)


async def _call_watching_disconnect(
    app: ASGIApp, request: RequestScope, asgi_scope: ASGIScope, receive: Receive, send: Send
) -> None:
    """Call ``app``, cancelling ``request``'s forks if the client goes before the response.

    A pump task reads the server's ``receive`` and hands each message on through a
    one-slot buffer, so the body keeps its backpressure; once the body is complete the pump
    keeps listening, and the only message left to come is ``http.disconnect``.
    """
    response_complete = False
    disconnected = False
    to_app, from_pump = anyio.create_memory_object_stream[Message](1)

    async def pump() -> None:
        async with to_app:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    nonlocal disconnected
                    if not response_complete:
                        disconnected = True
                        request.cancel()
                    await to_app.send(message)
                    return
                await to_app.send(message)

    async def app_receive() -> Message:
        try:
            return await from_pump.receive()
        except anyio.EndOfStream:
            return {"type": "http.disconnect"}

    async def app_send(message: Message) -> None:
        nonlocal response_complete
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            response_complete = True
        await send(message)

    error: Exception | None = None
    async with anyio.create_task_group() as task_group, from_pump:
        task_group.start_soon(pump)
        try:
            await app(asgi_scope, app_receive, app_send)
        except Exception as exc:  # re-raised below, unwrapped by the task group
            error = exc
        finally:
            task_group.cancel_scope.cancel()
    if error is not None:
        if disconnected and isinstance(error, CancelledError):
            # The endpoint awaited a fork cancelled because its client left: there is
            # nobody to answer, and it is not a server error.
            return
        raise error


def current_request_scope() -> RequestScope | None:
    """The scope of the request being handled, or ``None`` outside the middleware."""
    return _current_request.get()


async def request_scope() -> RequestScope:
    """Dependency: the current request's :class:`RequestScope`.

    ``scope: Annotated[RequestScope, Depends(anyfork.fastapi.request_scope)]``. It opens
    nothing (no task group spans a dependency's ``yield``): the middleware owns the scope.

    :raises RuntimeError: if :class:`ForkScopeMiddleware` is not installed
    """
    request = _current_request.get()
    if request is None:
        raise RuntimeError(
            "no anyfork request scope: add the middleware with "
            "'app.add_middleware(anyfork.fastapi.ForkScopeMiddleware)'"
        )
    return request


def fork_policy(policy: Policy) -> Callable[[], Awaitable[None]]:
    """A route dependency that sets the request's :data:`Policy` for unfinished forks.

    ``@app.post("/orders", dependencies=[Depends(anyfork.fastapi.fork_policy("detach"))])``

    :raises ValueError: at once, if ``policy`` is not ``"join"``, ``"cancel"`` or ``"detach"``
    """
    checked = _check_policy(policy)

    async def set_fork_policy() -> None:
        (await request_scope()).policy = checked

    return set_fork_policy
