"""Waiting on futures: ``wait``, ``wait_async``, ``collect_all`` and ``wait_all``
(``as_completed`` is in ``_as_completed.py``).

Besides anyfork's own futures these accept ``concurrent.futures.Future`` (what
``ThreadPoolExecutor.submit`` and ``asyncio.run_coroutine_threadsafe`` return) and, when
torch is imported, torch futures (``torch.futures.Future`` and the ``torch._C.Future`` that
``torch.jit.fork`` returns), each adapted into an anyfork future that follows it.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import threading
import time
from collections.abc import Iterable
from typing import Any, TypeVar, cast, overload

from ._blocking import may_run_inline
from ._foreign import follow_concurrent
from ._future import Future, block_until_done
from ._state import is_finished, on_done, settle, steal
from ._torch import TorchFuture, follow_torch, is_torch_future
from ._validate import check_timeout

__all__ = ["as_future", "check_iterable", "collect_all", "wait", "wait_all", "wait_async"]

T = TypeVar("T")


def as_future(obj: object, caller: str) -> Future[Any]:
    """Return ``obj`` as an anyfork future, or raise a TypeError naming ``caller``."""
    # mypy sees Future[Any] after isinstance, pyright Future[Unknown]: the casts serve pyright.
    if isinstance(obj, Future):
        return cast("Future[Any]", obj)  # type: ignore[redundant-cast]
    if isinstance(obj, concurrent.futures.Future):
        return follow_concurrent(cast("concurrent.futures.Future[Any]", obj))  # type: ignore[redundant-cast]
    if is_torch_future(obj):
        return follow_torch(obj)
    hint = ""
    if obj is None:
        hint = ": did the function that should return the future forget to?"
    elif inspect.iscoroutine(obj):
        obj.close()  # it will never run: spare the user a "never awaited" warning too
        hint = ": await a coroutine, or fork its coroutine function to get a future"
    raise TypeError(
        f"{caller}() takes an anyfork.Future, a concurrent.futures.Future or a "
        f"torch.futures.Future, got "
        f"{type(obj).__name__} {obj!r}{hint}"
    )


@overload
def wait(future: Future[T], timeout: float | None = None) -> T: ...
@overload
def wait(future: concurrent.futures.Future[T], timeout: float | None = None) -> T: ...
@overload
def wait(future: TorchFuture[T], timeout: float | None = None) -> T: ...
def wait(future: Any, timeout: float | None = None) -> Any:
    """Block until ``future`` is done and return its value (the blocking form of ``await``).

    A sync fork that has not started yet runs in the waiting thread instead (work stealing).
    Called on an event-loop thread, it returns the value of a done future and raises
    :class:`WouldBlockError` for a pending one rather than freezing the loop.

    :param future: an :class:`anyfork.Future`, a :class:`concurrent.futures.Future` or a
        ``torch.futures.Future`` (no thread waits for it: its done callback wakes ours)
    :param timeout: seconds to wait at most; ``None`` (or ``math.inf``) waits for as long as
        it takes
    :raises TypeError: if ``future`` is neither kind of future
    :raises ValueError: if ``timeout`` is negative or NaN
    :raises TimeoutError: if the timeout elapses first
    :raises CancelledError: if the future was cancelled
    :raises WouldBlockError: if called on an event-loop thread for a pending future
    """
    try:
        return as_future(future, "wait").wait(timeout)
    finally:
        del future  # a frame that re-raises a future's error must not hold it (Future._outcome)


@overload
async def wait_async(future: Future[T]) -> T: ...
@overload
async def wait_async(future: concurrent.futures.Future[T]) -> T: ...
@overload
async def wait_async(future: TorchFuture[T]) -> T: ...
async def wait_async(future: Any) -> Any:
    """Wait for ``future`` without blocking the event loop and return its value.

    The same as ``await future`` for an anyfork future, and accepts a
    :class:`concurrent.futures.Future` or a ``torch.futures.Future`` too (awaiting one holds
    no thread: the torch future's done callback wakes the waiting loop). Cancelling the
    waiting task stops the waiting, never the work: other callers may be waiting for the
    same future.

    :raises TypeError: if ``future`` is neither kind of future
    :raises CancelledError: if the future was cancelled
    """
    try:
        return await as_future(future, "wait_async")
    finally:
        del future  # a frame that re-raises a future's error must not hold it (Future._outcome)


@overload
def collect_all(futures: Iterable[Future[T]]) -> Future[list[Future[T]]]: ...
@overload
def collect_all(futures: Iterable[Any]) -> Future[list[Future[Any]]]: ...
def collect_all(futures: Iterable[Any]) -> Future[list[Future[Any]]]:
    """Return a future that is done when every future in ``futures`` is done.

    Its value is the list of those futures, in input order, each done (read each with
    :meth:`Future.value`); like ``torch.futures.collect_all`` it never fails itself. An empty
    input gives a future already done with ``[]``. ``concurrent.futures.Future`` and torch future
    inputs appear in the list as the anyfork futures that follow them.

    Example::

        everything = await anyfork.collect_all([fork(a), fork(b)])
        values = [f.value() for f in everything]
    """
    members = _as_futures(futures, "collect_all")
    combined: Future[list[Future[Any]]] = Future(name="collect_all")
    remaining = len(members)
    if not remaining:
        settle(combined, [])
        return combined
    lock = threading.RLock()

    def one_done(_: Future[Any]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            settle(combined, members)

    for member in members:
        on_done(member, one_done)
    return combined


@overload
def wait_all(futures: Iterable[Future[T]], timeout: float | None = None) -> list[T]: ...
@overload
def wait_all(futures: Iterable[Any], timeout: float | None = None) -> list[Any]: ...
def wait_all(futures: Iterable[Any], timeout: float | None = None) -> list[Any]:
    """Block until every future is done, then return their values in input order.

    Waiting continues past a failure; once all are done, the first failure in input order
    is raised. Without a timeout, sync forks that no worker has started yet run in the
    waiting thread (work stealing, from the last one back), so the waiting thread helps
    rather than idles; with a timeout nothing runs inline, so the timeout holds.

    :param timeout: seconds to wait for all of them at most; ``None`` (or ``math.inf``)
        waits for as long as it takes
    :raises ValueError: if ``timeout`` is negative or NaN
    :raises TimeoutError: if the timeout elapses first
    """
    members = _as_futures(futures, "wait_all")
    timeout = check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if timeout is None and may_run_inline():
            _run_unstarted_from_the_back(members)
        _block_until_all_done(members, deadline)
        return _values_in_order(members)
    finally:
        # A frame that re-raises a future's error must not hold it (see Future._outcome).
        del futures, members


def _run_unstarted_from_the_back(members: list[Future[Any]]) -> None:
    # Help first: run sync forks that no worker has started yet, from the last one back,
    # while the workers take them from the front. With fewer worker threads than forks the
    # waiting thread works instead of idling on a running one.
    for member in reversed(members):
        steal(member)


def _block_until_all_done(members: list[Future[Any]], deadline: float | None) -> None:
    for member in members:
        if not member.done():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            block_until_done(member, left)


def _values_in_order(members: list[Future[Any]]) -> list[Any]:
    """The values of done futures, or the first failure in input order, raised."""
    first_not_finished = next((m for m in members if not is_finished(m)), None)
    if first_not_finished is None:
        return [member.value() for member in members]
    del members
    try:
        return [first_not_finished.value()]  # raises its exception or CancelledError
    finally:
        del first_not_finished


def _as_futures(futures: Iterable[Any], caller: str) -> list[Future[Any]]:
    check_iterable(futures, caller)
    return [as_future(item, caller) for item in futures]


def check_iterable(futures: object, caller: str) -> None:
    if isinstance(futures, (Future, concurrent.futures.Future)) or not isinstance(
        futures, Iterable
    ):
        raise TypeError(f"{caller}() takes a list of futures, got {futures!r}")
