"""A remote fork as a Dask task: sent to a client, run on a worker, followed to its end.

The lowest layer of ``anyfork.dask``: :func:`submit_to` sends one fork to a
``distributed.Client`` as a task that runs :func:`run_on_worker`, attaches the work that
cancels it, and hands it to the client's follower, which completes the fork with the task's
outcome, in batches, on anyfork's worker pool. Importing this module registers how a
blocking wait inside a Dask task leaves the worker's thread pool: a worker imports it to
unpickle :func:`run_on_worker`, so the hook is in place wherever a remote fork runs.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import distributed
import distributed.threadpoolexecutor
import distributed.utils

from . import _blocking, _pool
from ._errors import RemoteImportError
from ._future import Future
from ._state import Work, attach, settle, settle_failed
from ._torch import GradMode, run_in_grad_mode

__all__ = ["RemoteCall", "RemoteImportError", "run_on_worker", "submit_to"]

# distributed is only partly typed: its calls go through these untyped handles.
_secede: Any = distributed.secede
_rejoin: Any = distributed.rejoin
_as_completed: Any = distributed.as_completed
# A task's thread: the worker's pool marks it (proceed), the worker its task (key).
_pool_thread_state: Any = getattr(distributed.threadpoolexecutor, "thread_state")  # noqa: B009
_task_thread_state: Any = getattr(distributed.utils, "thread_state")  # noqa: B009


# --- on the worker -----------------------------------------------------------------------


def _loads(payload: bytes, what: str) -> Any:
    try:
        return cloudpickle.loads(payload)
    except (ImportError, AttributeError) as exc:
        raise RemoteImportError(
            f"the Dask worker could not load {what}: {exc}. A worker imports a forked "
            "function (and the classes of its arguments) by module, as pickle does: install "
            "that module where the workers run (the same environment as here), or define "
            "the function in the script you run (__main__), which is sent by value"
        ) from None


def run_on_worker(func: bytes, call: bytes, grad_mode: GradMode | None) -> Any:
    """The task a remote fork runs on a Dask worker (public for pickling by reference)."""
    function = _loads(func, "the forked function")
    args, kwargs = _loads(call, f"the arguments of {getattr(function, '__qualname__', func)}")
    return run_in_grad_mode(grad_mode, function, args, kwargs)


# --- one remote fork ---------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteCall:
    """One remote fork's call, ready to send: the function and its arguments pickled, the
    grad mode to run it in, and its Dask options."""

    func: bytes
    call: bytes
    grad_mode: GradMode | None
    options: dict[str, Any]


def submit_to(
    client: Any,  # a distributed.Client
    future: Future[Any],
    remote_call: RemoteCall,
) -> None:
    # A unique key, and pure=False: Dask would otherwise run equal calls once.
    key = f"{future.name or 'fork'}-anyfork-{uuid.uuid4().hex}"
    dask_future = client.submit(
        run_on_worker,
        remote_call.func,
        remote_call.call,
        remote_call.grad_mode,
        key=key,
        pure=False,
        **remote_call.options,
    )
    work = _DaskWork(client, dask_future)
    attach(future, work)
    if future.cancelled():  # cancelled while it was being sent: its cancel missed the task
        work.cancel(future)
        return
    _follower(client).follow(dask_future, future)


class _DaskWork(Work):
    """Cancelling a remote fork asks Dask to drop its task, without waiting: queued work
    never runs; running work finishes on its worker and its result is discarded."""

    __slots__ = ("_client", "_dask_future")

    kind = "remote"

    def state(self, future: Future[Any]) -> str:
        # Sent to the cluster: when it starts there is the scheduler's business.
        return "running"

    def __init__(self, client: Any, dask_future: distributed.Future[Any]) -> None:
        self._client = client
        self._dask_future = dask_future

    def cancel(self, future: Future[Any]) -> None:
        try:
            self._client.loop.add_callback(
                self._client.cancel, [self._dask_future], asynchronous=True
            )
        except RuntimeError:  # the client's loop is closed: the task is gone with it
            pass


# --- following remote forks to their end ------------------------------------------------


# While other forks still run, a finished one waits for more to gather with it for this
# many gathers' time, and never longer than _MOST_WAITED seconds.
_GATHERS_WAITED = 4
_MOST_WAITED = 0.02


class _Follower:
    """The remote forks of one client, followed to their end on the client's loop in
    batches: each turn takes every task that finished since the last one and gathers their
    results in one ``client.gather`` (one round trip to the scheduler per batch, not per
    fork). Each fork is then completed on anyfork's worker pool, so that its callbacks (and
    forks made in them) never run on Dask's loop. A failed or cancelled task, and a batch
    whose gather fails, are followed one by one (:func:`_follow`), so that each fork gets
    its own error."""

    def __init__(self, loop: Any) -> None:
        self._lock = threading.Lock()
        # Dropping the last reference to a Dask future releases its task: held here until
        # its fork is completed.
        self._forks: dict[object, tuple[Any, Future[Any]]] = {}
        self._finished: Any = _as_completed(loop=loop)  # a distributed.as_completed
        self._loop = loop
        self._running = False
        self._gather_time = 0.0  # seconds: a moving average of the last gathers

    def follow(self, dask_future: Any, future: Future[Any]) -> None:
        """Follow ``dask_future`` (any thread) and complete ``future`` with its outcome."""
        with self._lock:
            self._forks[dask_future.key] = (dask_future, future)
            self._finished.add(dask_future)
            start, self._running = not self._running, True
        if start:
            self._loop.add_callback(self._run)

    async def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._forks:  # follow() starts another run for the next fork
                        self._running = False
                        return
                # Never StopAsyncIteration here: every fork followed is still in it.
                first = await self._finished.__anext__()
                await self._complete(await self._more([first]))
        except BaseException as exc:
            with self._lock:
                forks, self._forks, self._running = self._forks, {}, False
            if isinstance(exc, asyncio.CancelledError):  # the client's loop is closing
                for _, future in forks.values():
                    _pool.submit(functools.partial(settle_failed, future, _closed(future)))
            else:  # a bug here must not leave the forks pending forever
                for _, future in forks.values():
                    _pool.submit(functools.partial(settle_failed, future, exc))
            raise

    async def _more(self, batch: list[Any]) -> list[Any]:
        """Add to ``batch`` the tasks that finish within a short window, while others are
        still running. Each gather costs the scheduler (and, for a LocalCluster, this
        process) a round trip, which slows the tasks still running: the window is a few
        gathers long (at most ``_MOST_WAITED``), so that gathering takes a small share of a
        fan-out. The last fork of a fan-out, or one call at a time, is never held back."""
        batch += self._finished.next_batch(block=False)
        deadline = time.monotonic() + min(_GATHERS_WAITED * self._gather_time, _MOST_WAITED)
        while len(batch) < len(self._forks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._finished.__anext__(), remaining))
            except asyncio.TimeoutError:
                break
            batch += self._finished.next_batch(block=False)
        return batch

    async def _complete(self, batch: list[Any]) -> None:
        with self._lock:
            forks = [self._forks.pop(dask_future.key) for dask_future in batch]
        finished = [(d, f) for d, f in forks if d.status == "finished"]
        one_by_one = [(d, f) for d, f in forks if d.status != "finished"]
        if finished:
            client = finished[0][0].client
            try:
                started = time.monotonic()
                values = await client.gather([d for d, _ in finished], asynchronous=True)
                # A moving average: what one more gather would cost.
                self._gather_time += (time.monotonic() - started - self._gather_time) / 4
            except asyncio.CancelledError:
                for _, future in finished:
                    _pool.submit(functools.partial(settle_failed, future, _closed(future)))
                raise
            except Exception:  # e.g. a result lost with its worker, and then its task
                one_by_one += finished
            else:
                for (_, future), value in zip(finished, values, strict=True):
                    _pool.submit(functools.partial(settle, future, value))
        for dask_future, future in one_by_one:  # each on its own, so none waits for another
            self._loop.add_callback(_follow, dask_future.client, dask_future, future)


_followers_lock = threading.Lock()
_followers: weakref.WeakKeyDictionary[Any, _Follower] = weakref.WeakKeyDictionary()


def _follower(client: Any) -> _Follower:
    """The follower of ``client``'s remote forks (a client: anyfork's, or a worker's)."""
    with _followers_lock:
        follower = _followers.get(client)
        if follower is None:
            follower = _followers[client] = _Follower(client.loop)
        return follower


def _closed(future: Future[Any]) -> RuntimeError:
    return RuntimeError(f"the Dask client closed before {future.name} finished")


async def _follow(client: Any, dask_future: distributed.Future[Any], future: Future[Any]) -> None:
    """On the client's loop: wait for one task, then complete ``future`` on anyfork's
    worker pool. A fork's error comes from here: the task's own exception (or a plain one
    if its type could not be loaded here), ``KilledWorker``, or ``FutureCancelledError``
    for a lost scheduler, which fails the fork rather than cancelling it."""
    try:
        value = await client.gather(dask_future, asynchronous=True)
    except asyncio.CancelledError:
        _pool.submit(functools.partial(settle_failed, future, _closed(future)))
        raise
    except BaseException as exc:  # the task's error, a lost scheduler, a killed worker
        job = functools.partial(settle_failed, future, exc)
    else:
        job = functools.partial(settle, future, value)
    del dask_future
    _pool.submit(job)


# --- blocking waits inside Dask tasks ----------------------------------------------------


def _secede_from_dask_task() -> Callable[[], object] | None:
    """A blocking wait in a Dask task's thread leaves the worker's thread pool while it
    waits, as ``distributed.secede`` documents, so nested fork-and-wait cannot deadlock."""
    if not getattr(_pool_thread_state, "proceed", False) or not hasattr(_task_thread_state, "key"):
        return None  # not running a task in a worker's pool, or seceded already
    _secede()
    rejoin: Callable[[], object] = _rejoin
    return rejoin


_blocking.add_blocking_wait_hook(_secede_from_dask_task)
