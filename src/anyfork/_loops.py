"""Which event loop (if any) the calling thread belongs to, and how to reach a loop from
another thread without waiting for it.

This is the only module that looks beneath anyio's public API: anyio records the loop of
its worker threads in a thread-local, and knows how to schedule a callback on a loop
without blocking (``AsyncBackend.run_sync_soon``), but exposes neither as a public
function. Both are covered by tests so that an anyio upgrade which moves them fails loudly.
So is anyio's per-task state on asyncio, whose entries for the tasks of a loop closed
without cancelling them must be dropped for the loop to be freed
(``forget_tasks_of_closed_loop``). Version- and backend-specific asyncio details live here
too (``Task.cancelling``, timers a closed loop drops).
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import types
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from anyio import RunFinishedError
from anyio._core._eventloop import get_async_backend, threadlocals
from anyio.abc import AsyncBackend
from anyio.lowlevel import EventLoopToken

__all__ = [
    "Awaiting",
    "WorkerThreadClaim",
    "call_soon",
    "call_soon_here",
    "call_when_closed",
    "check_anyio",
    "forget_loops_in_child",
    "forget_tasks_of_closed_loop",
    "in_task",
    "is_stopped",
    "load_backends",
    "loop_waiter",
    "running_native_loop",
    "set_managed_blocking",
    "set_stop_check",
    "spawn_detached",
    "task_cancelled_natively",
    "token_for",
    "wakes_a_task",
    "worker_thread_token",
]


def load_backends() -> None:
    """Import anyio's backend modules now, off any event loop.

    anyio imports a backend on its first use in a running loop: up to a hundred
    milliseconds in which that loop is blocked (asyncio's debug mode reports it). This
    loads the asyncio backend, and trio's if trio is already imported. anyfork calls it
    when it is imported; call it again after importing trio to do the same for trio.
    """
    get_async_backend("asyncio")
    if "trio" in sys.modules:
        get_async_backend("trio")


def check_anyio() -> None:
    """Fail at import, with the fix, if the installed anyio lacks what anyfork relies on.

    Without this, an older anyio fails later and obscurely: on anyio 4.15 the first fork
    on a loop raised ``AttributeError: ... run_sync_soon``.
    """
    backend = get_async_backend("asyncio")
    missing = [name for name in ("run_sync_soon",) if not hasattr(backend, name)]
    if missing:
        from importlib.metadata import version

        raise ImportError(
            f"anyfork needs anyio >= 4.16 (its AsyncBackend.{missing[0]}), but anyio "
            f"{version('anyio')} is installed: pip install 'anyio>=4.16'"
        )


load_backends()
check_anyio()


def running_native_loop() -> object | None:
    """Return the loop running the calling code (asyncio loop or trio token), else ``None``.

    Both may be visible in one thread: trio in guest mode (``start_guest_run``) runs its
    tasks inside the callbacks of an asyncio host loop. Then sniffio decides, as it does for
    anyio: trio marks the stretches in which it runs.
    """
    loop = asyncio._get_running_loop()
    if "trio" not in sys.modules:
        return loop
    token = _trio_run_here(loop)
    return loop if token is None else token


def _trio_run_here(loop: asyncio.AbstractEventLoop | None) -> object | None:
    """The token of the trio run that runs the calling code, else ``None``."""
    trio = sys.modules["trio"]
    if not trio.lowlevel.in_trio_run():
        return None
    if loop is not None:  # guest mode on an asyncio host: which of them runs this code?
        import sniffio

        try:
            if sniffio.current_async_library() != "trio":
                return None
        except sniffio.AsyncLibraryNotFoundError:  # a host callback outside any task
            return None
    token: object = trio.lowlevel.current_trio_token()
    if token is _trio_run_of_parent:  # a child made by os.fork inside a trio run
        return None
    return token


# In a child made by os.fork inside a trio run: that run's token, which does not run there.
_trio_run_of_parent: object = None


def forget_loops_in_child() -> None:
    """In a child made by ``os.fork``: no loop of the parent's runs here, so this thread
    (the one that forked) belongs to none, whatever it was running in the parent.

    The loop it was running (Python 3.12+ forgets asyncio's itself), a trio run, and the
    loop an anyio worker thread (a sync fork, a FastAPI ``def`` endpoint) reaches with
    ``anyio.from_thread``: forks made in the child must not go to any of them.
    """
    global _trio_run_of_parent
    asyncio._set_running_loop(None)
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        _trio_run_of_parent = trio.lowlevel.current_trio_token()
    values: dict[str, object] = threadlocals.__dict__
    values.pop("current_token", None)
    values.pop(_ORIGINAL_TOKEN, None)  # the loop's own token, kept while the worker one stands in
    values.pop("current_cancel_scope", None)
    if trio is not None:
        from trio._threads import PARENT_TASK_DATA

        for name in ("token", "abandon_on_cancel", "cancel_register"):
            PARENT_TASK_DATA.__dict__.pop(name, None)


def in_task() -> bool:
    """Whether this code runs inside a task, where anyio can tell which library runs it.

    asyncio runs plain callbacks (``call_soon``, done callbacks) outside any task; anyio
    cannot detect the backend there. Trio marks its whole thread, so it always can.
    """
    native = running_native_loop()
    if not isinstance(native, asyncio.AbstractEventLoop):  # trio's
        return True
    return asyncio.current_task(native) is not None


def token_for(native: object) -> EventLoopToken:
    """Build anyio's token for a native loop running in this thread.

    Unlike ``anyio.lowlevel.current_token()`` this also works outside any task, e.g. in a
    done callback that asyncio runs with ``call_soon``.
    """
    backend = "asyncio" if isinstance(native, asyncio.AbstractEventLoop) else "trio"
    return EventLoopToken(get_async_backend(backend), native)


def worker_thread_token() -> EventLoopToken | None:
    """Return the loop token of an anyio worker thread (``to_thread.run_sync``), else None."""
    # The thread's own dict of the thread-local: a missing name costs no AttributeError.
    values: dict[str, Any] = threadlocals.__dict__
    token: EventLoopToken | None = values.get(_ORIGINAL_TOKEN) or values.get("current_token")
    return token


def call_soon_here(native: object, func: Callable[..., object], *args: object) -> None:
    """Schedule ``func(*args)`` on the loop ``native``, which runs in this thread, for the
    next time it gets control (cheaper than :func:`call_soon` in a task: no wake-up of the
    loop needed).

    Outside any task the loop may be idle in ``select()``: a ``signal.signal`` handler runs
    there, and asyncio's ``call_soon`` would not wake it, so the call would wait for the
    loop's next timer or I/O. There asyncio gets the thread-safe call, which does.
    """
    if isinstance(native, asyncio.AbstractEventLoop):
        if asyncio.current_task(native) is None:
            native.call_soon_threadsafe(func, *args)
        else:
            native.call_soon(func, *args)
    else:
        native.run_sync_soon(func, *args)  # type: ignore[attr-defined]  # a TrioToken


# What a worker thread does around a blocking call back into its loop (managed blocking,
# set by the worker pool: secede before, rejoin after). _loops imports nothing of anyfork.
_managed_blocking: tuple[Callable[[], object], Callable[[Any], object]] | None = None
_worker_backends: dict[type[AsyncBackend], type[AsyncBackend]] = {}
# The thread-local entry that keeps the loop's own token while current_token is the
# worker one (see WorkerThreadClaim).
_ORIGINAL_TOKEN = "anyfork_original_token"


def set_managed_blocking(secede: Callable[[], object], rejoin: Callable[[Any], object]) -> None:
    """Have sync forks that call ``anyio.from_thread.run``/``run_sync`` call ``secede``
    before that blocking call and ``rejoin`` (with what ``secede`` returned) after it."""
    global _managed_blocking
    _managed_blocking = (secede, rejoin)


def set_stop_check(stop_asked: Callable[[], bool]) -> None:
    """Have ``anyio.from_thread.check_cancelled()`` (and trio's own) raise the loop's
    cancellation exception in a sync fork of a loop once ``stop_asked()`` (called in the
    fork's thread) returns ``True``: the fork was asked to stop."""
    global _stop_check
    _stop_check = stop_asked


_stop_check: Callable[[], bool] | None = None


def _worker_backend(backend_class: type[AsyncBackend]) -> type[AsyncBackend]:
    """A subclass of anyio's backend class for the token of a sync fork's thread.

    Its blocking calls from a thread back into the loop (``from_thread.run``/``run_sync``
    go through them) give the worker thread's place in the pool back while they block, as
    anyfork's own waits do; its ``check_cancelled`` (what ``from_thread.check_cancelled``
    calls) raises once the fork was asked to stop. On trio, anyio's ``check_cancelled``
    calls trio's, which reads the cancel register that :class:`WorkerThreadClaim` installs.
    """
    worker = _worker_backends.get(backend_class)
    if worker is not None:
        return worker
    on_asyncio = issubclass(backend_class, get_async_backend("asyncio"))

    class WorkerBackend(backend_class):  # type: ignore[misc, valid-type]
        @classmethod
        def run_async_from_thread(cls, func: Any, args: Any, token: object) -> Any:
            if _managed_blocking is None:
                return super().run_async_from_thread(func, args, token)
            secede, rejoin = _managed_blocking
            departure = secede()
            try:
                return super().run_async_from_thread(func, args, token)
            finally:
                rejoin(departure)

        @classmethod
        def run_sync_from_thread(cls, func: Any, args: Any, token: object) -> Any:
            if _managed_blocking is None:
                return super().run_sync_from_thread(func, args, token)
            secede, rejoin = _managed_blocking
            departure = secede()
            try:
                return super().run_sync_from_thread(func, args, token)
            finally:
                rejoin(departure)

        @classmethod
        def check_cancelled(cls) -> None:
            if on_asyncio and _stop_check is not None and _stop_check():
                raise asyncio.CancelledError("this sync fork was asked to stop")
            super().check_cancelled()

    WorkerBackend.__name__ = WorkerBackend.__qualname__ = backend_class.__name__
    _worker_backends[backend_class] = WorkerBackend
    return WorkerBackend


class _TrioCancelRegister(list[Any]):
    """What trio's worker threads hold as ``cancel_register``: ``[0]`` is the function
    that raises ``trio.Cancelled`` once the host task was cancelled, else ``None``; trio's
    ``from_thread.check_cancelled`` calls it. In a sync fork, it is there once the fork
    was asked to stop (read when checked: the request may come from any thread)."""

    def __init__(self) -> None:
        super().__init__([None])

    def __getitem__(self, index: Any) -> Any:
        if _stop_check is not None and _stop_check():
            return _raise_trio_cancelled
        return None


def _raise_trio_cancelled() -> None:
    import trio

    raise trio.Cancelled._create()  # pyright: ignore[reportPrivateUsage]


class WorkerThreadClaim:
    """Make this thread look like one of anyio's worker threads of a loop, for a while.

    Inside a sync fork started from an event loop, ``anyio.from_thread.run`` /
    ``run_sync`` then reach that loop without a token, exactly as inside
    ``anyio.to_thread.run_sync``. anyio reads the loop from a thread-local it sets in its
    own worker threads (and on trio, trio's from a thread-local of trio's); anyfork's
    worker pool sets the same ones. Forks made there find the loop the same way
    (:func:`worker_thread_token`). A running fork has no cancel scope of anyio's (a task
    started with ``from_thread.run`` belongs to no scope of the fork's), but
    ``from_thread.check_cancelled`` raises once the fork was asked to stop (see
    :func:`set_stop_check`): on asyncio through the token's backend class, on trio through
    the cancel register trio's own check reads.

    Every sync fork started from a loop goes through this, so it works on the
    thread-locals' per-thread dicts directly (no ``getattr`` that fails for a missing name).

    The token anyio's ``from_thread`` finds is the loop's, with a backend class
    (:func:`_worker_backend`) whose blocking calls back into the loop secede from the
    worker pool while they block (see :func:`set_managed_blocking`): a fork blocked there
    gives its place back, so the work its loop-side helper awaits (another sync fork)
    finds one at any ``worker_threads``.
    :func:`worker_thread_token` still returns the loop's own token.
    """

    __slots__ = ("_outer", "_trio_outer")

    def __init__(self, token: EventLoopToken) -> None:
        values: dict[str, object] = threadlocals.__dict__
        self._outer = (
            values.get("current_token", _MISSING),
            values.get("current_cancel_scope", _MISSING),
            values.get(_ORIGINAL_TOKEN, _MISSING),
        )
        values["current_token"] = EventLoopToken(
            _worker_backend(token.backend_class), token.native_token
        )
        values[_ORIGINAL_TOKEN] = token
        values["current_cancel_scope"] = None
        self._trio_outer: dict[str, object] | None = None
        if not isinstance(token.native_token, asyncio.AbstractEventLoop):
            from trio._threads import PARENT_TASK_DATA

            # As trio's own worker threads hold them. With abandon_on_cancel, trio runs
            # from_thread calls in its system nursery, as for an explicit trio_token.
            trio_values: dict[str, object] = PARENT_TASK_DATA.__dict__
            self._trio_outer = _swap(
                trio_values,
                {
                    "token": token.native_token,
                    "abandon_on_cancel": True,
                    "cancel_register": _TrioCancelRegister(),
                },
            )

    def release(self) -> None:
        values: dict[str, object] = threadlocals.__dict__
        _restore(values, "current_token", self._outer[0])
        _restore(values, "current_cancel_scope", self._outer[1])
        _restore(values, _ORIGINAL_TOKEN, self._outer[2])
        if self._trio_outer is not None:
            from trio._threads import PARENT_TASK_DATA

            _swap(PARENT_TASK_DATA.__dict__, self._trio_outer)


_MISSING = object()


def _restore(values: dict[str, object], name: str, value: object) -> None:
    if value is _MISSING:
        values.pop(name, None)
    else:
        values[name] = value


def _swap(values: dict[str, object], new: dict[str, object]) -> dict[str, object]:
    """Set entries of a thread-local's per-thread dict (removing those set to
    ``_MISSING``); return the previous values in the same form."""
    previous = {name: values.get(name, _MISSING) for name in new}
    for name, value in new.items():
        _restore(values, name, value)
    return previous


def call_soon(token: EventLoopToken, func: Callable[[], object]) -> bool:
    """Schedule ``func()`` on the loop of ``token`` from any thread, without waiting.

    :return: ``False`` if that loop is no longer running, so ``func`` will never run
    """
    try:
        token.backend_class.run_sync_soon(func, (), token.native_token)
    except RunFinishedError:
        return False
    except RuntimeError:
        # uvloop raises a plain RuntimeError for a closed loop
        return False
    return True


def loop_waiter() -> tuple[Callable[[object], None], Callable[[], Generator[Any, Any, object]]]:
    """Return ``(wake, wait)`` for the loop running in this thread: ``yield from wait()``
    (in an ``__await__``, or ``await Awaiting(wait)``) returns
    once ``wake(anything)`` has been called, from any thread, even after the loop closed.

    This sits on the hot path of every ``await fut``, so it uses each backend's cheapest
    primitive (an asyncio future, a trio event) instead of ``anyio.Event`` plus a token.
    """
    loop = running_native_loop()
    loop_thread = threading.get_ident()
    if isinstance(loop, asyncio.AbstractEventLoop):
        waiter = loop.create_future()

        def wake_asyncio(_: object) -> None:
            if threading.get_ident() == loop_thread:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                try:
                    loop.call_soon_threadsafe(_resolve, waiter)
                except RuntimeError:  # the loop has closed; nobody is waiting any more
                    pass

        return wake_asyncio, waiter.__await__

    import trio

    event = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake_trio(_: object) -> None:
        if threading.get_ident() == loop_thread:
            event.set()
        else:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

    return wake_trio, lambda: event.wait().__await__()


class Awaiting:
    """``await Awaiting(wait)`` waits as ``yield from wait()`` does, for a ``wait`` of
    :func:`loop_waiter` (which returns an ``__await__`` generator: no coroutine of its own
    on the hot path of ``await fut``)."""

    __slots__ = ("_wait",)

    def __init__(self, wait: Callable[[], Generator[Any, Any, object]]) -> None:
        self._wait = wait

    def __await__(self) -> Generator[Any, Any, object]:
        return self._wait()


# The functions loop_waiter makes: callbacks that only wake a task awaiting a future.
_WAKERS = frozenset(
    const for const in loop_waiter.__code__.co_consts if isinstance(const, types.CodeType)
)


def wakes_a_task(callback: object) -> bool:
    """Whether ``callback`` is a ``wake`` of :func:`loop_waiter` (cheap, never blocks)."""
    return getattr(callback, "__code__", None) in _WAKERS


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def spawn_detached(native: object, func: Callable[[], Coroutine[Any, Any, None]]) -> object:
    """Start ``func()`` as a task owned by the loop itself rather than by the caller.

    It must be called on the loop's thread. On asyncio the task is cancelled when
    ``asyncio.run`` shuts the loop down; on trio it is a system task, cancelled when the
    main task returns. The caller keeps the returned task object alive.
    """
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.create_task(func(), name="anyfork ambient task group")

    import trio

    return trio.lowlevel.spawn_system_task(func, name="anyfork ambient task group")


def task_cancelled_natively() -> bool:
    """Whether the current asyncio task was cancelled with ``Task.cancel()`` and has not
    been uncancelled, e.g. by ``asyncio.run`` shutting the loop down.

    anyio's cancel scopes cancel tasks this way too; check them first
    (``anyio.lowlevel.checkpoint_if_cancelled``). Python 3.10 keeps no count of requested
    cancellations (``Task.cancelling()`` is new in 3.11): there, and on trio, where every
    cancellation goes through a cancel scope, this is always ``False``.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread: trio
        return False
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0


class _ClosedSentinel:
    """A timer callback the loop alone holds: freed when ``loop.close()`` drops its timers."""

    __slots__ = ("__weakref__",)

    def __call__(self) -> None:  # pragma: no cover - its timer never fires
        pass


def call_when_closed(native: object, callback: Callable[[], object]) -> None:
    """Call ``callback()`` when the asyncio loop ``native`` is closed, on the closing thread.

    It fires even for a loop closed without cancelling its tasks (``run_until_complete``
    then ``close()``), which no task can observe. Nothing for trio: a run always cancels
    its system tasks when it ends. Call it on the loop's thread; ``callback`` must not
    keep the loop alive (hold it weakly).
    """
    if not isinstance(native, asyncio.AbstractEventLoop):
        return
    sentinel = _ClosedSentinel()
    native.call_later(math.inf, sentinel)
    weakref.finalize(sentinel, callback).atexit = False


def forget_tasks_of_closed_loop(native: object, quiet: object) -> None:
    """Let a closed asyncio loop, and its tasks that never finished, be freed.

    anyio keeps per-task state in a weak-keyed table whose values (cancel scopes) hold
    their task strongly: a task that never finishes (its loop was closed without cancelling
    it) is kept forever, and with it its loop. ``quiet`` is a task of anyfork's own, not to
    be reported as "destroyed but it is pending" when it is freed.
    """
    if not isinstance(native, asyncio.AbstractEventLoop):
        return
    from anyio._backends import _asyncio as anyio_asyncio

    # WeakKeyDictionary[asyncio.Task, TaskState]
    task_states: Any = getattr(anyio_asyncio, "_task_states")  # noqa: B009
    tasks: list[asyncio.Task[Any]] = []
    for _ in range(10):  # another loop's thread may change the table while we read it
        try:
            tasks = list(task_states.keys())
            break
        except RuntimeError:  # pragma: no cover - "changed size during iteration"
            continue
    else:  # pragma: no cover
        return
    for task in tasks:
        if task.get_loop() is native and not task.done():
            task_states.pop(task, None)
    if isinstance(quiet, asyncio.Task):
        quiet._log_destroy_pending = False  # type: ignore[attr-defined]
        # Close its coroutine now rather than when the garbage collector finds it: the
        # clean-up it runs then fails (no loop), and the failure would be printed.
        try:
            quiet.get_coro().close()
        except Exception:
            pass


def is_stopped(native: object) -> bool:
    """Whether the asyncio loop ``native`` is not running (trio: never, see above)."""
    return isinstance(native, asyncio.AbstractEventLoop) and not native.is_running()
