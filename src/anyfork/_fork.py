"""``fork()``: the one place that decides where work runs.

=============================  ===========================  ==============================
caller                         coroutine function           sync callable
=============================  ===========================  ==============================
task on a running loop         task in innermost scope      the worker pool (``_pool``),
                               (``_scope``), else the       from the loop's next turn;
                               loop's ambient group         the exit join (``_exit``)
                               (``_groups``)                tracks it
worker thread of a loop        the same, on that loop       the same
no loop                        the background loop          the same
                               (``_background``)
eager mode                     where no loop runs: run now  called now, in the caller
                               in the caller; else as above
any caller, a remote callable  (not allowed)                its cluster (``anyfork.dask``,
(``_remote.RemoteCallable``)                                through ``_remote``); scopes
                                                            and the exit join track it
=============================  ===========================  ==============================

A new place for work to run is one new module (like ``_pool`` or ``_background``) plus one
row here.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import types
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast, overload

import anyio
from anyio.lowlevel import EventLoopToken
from typing_extensions import ParamSpec

from . import _loops
from ._ambient import ambient_group
from ._background import background
from ._callables import is_coroutine_function, unwrap_partial
from ._config import current_config
from ._debug import fork_site, watch_slow_forks
from ._exit import exit_join
from ._future import (
    Future,
    Work,
    attach,
    claim,
    note_forked,
    release_claim,
    settle,
    settle_failed,
    without_catching_frame,
)
from ._groups import ForkGroup
from ._pool import hand_over, is_deferred, submit_fork
from ._remote import RemoteCallable
from ._scope import current_scope_group
from ._torch import capture_grad_mode

__all__ = ["fork"]

T = TypeVar("T")
P = ParamSpec("P")


@overload
def fork(
    func: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
) -> Future[T]: ...


@overload
def fork(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...


def fork(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
    """Start ``func(*args, **kwargs)`` and return a :class:`Future` of its result at once.

    Coroutine functions run as anyio tasks on the current event loop (in the innermost
    :func:`scope`, else in the loop's ambient task group). Sync callables — functions, bound
    methods, builtins, callable objects such as an ``nn.Module`` — run on anyfork's worker
    pool, off the loop, wherever they are forked. Where no loop runs, coroutine functions go
    to a background event loop. The current :mod:`contextvars` are copied into the fork.

    A sync callable that returns a coroutine — ``fork(lambda: fetch(1))``, or a ``def``
    declared to return ``Coroutine[Any, Any, T]`` — is typed ``Future[T]``, like an
    ``async def`` (no type checker can tell the two apart), and runs as one: the call runs
    on the worker pool, then the coroutine it returned runs as a task wherever a coroutine
    fork made by the caller would, in the same scope.

    Any error of the work itself is stored in the future and raised when it is waited for,
    never by ``fork``.

    :param func: the callable to run; positional-only, so ``func`` may itself take a
        keyword argument named ``func``
    :param args: positional arguments for ``func``
    :param kwargs: keyword arguments for ``func``
    :return: a future of ``func``'s (awaited) result
    :raises TypeError: if ``func`` is not callable, is a coroutine object, or is an async
        generator function or a ``@types.coroutine`` generator function (neither gives one
        result to wait for)
    :raises ShutdownError: if called while the interpreter is shutting down, outside a loop

    Example::

        async def handler() -> str:
            features = anyfork.fork(fetch_features, user_id=7)  # async: a task
            score = anyfork.fork(model, [1.0, 2.0])  # sync: a worker thread
            return f"{await features} {await score}"
    """
    if not callable(func):
        if inspect.iscoroutine(func):
            func.close()  # it will never run; spare the user a 'never awaited' warning
            raise TypeError(
                "fork() takes the coroutine function and its arguments, not a coroutine "
                f"object: write fork({func.__qualname__}, ...) instead of "
                f"fork({func.__qualname__}(...))"
            )
        raise TypeError(f"fork() takes a callable, got {type(func).__name__} {func!r}")
    # Plain functions and bound methods, the common case, are read off their code object
    # in one go (inspect's checks cost several µs a fork); anything else goes through the
    # general checks.
    plain = getattr(func, "__func__", func)
    if type(plain) is types.FunctionType and not hasattr(plain, "_is_coroutine_marker"):
        flags = plain.__code__.co_flags
        if flags & _GENERATOR_KINDS:
            _reject_generator_kinds(func)
        is_async = bool(flags & inspect.CO_COROUTINE)
        name = plain.__qualname__
        may_be_remote = False
    else:
        _reject_generator_kinds(func)
        is_async = is_coroutine_function(func)
        name = _name_of(func)
        may_be_remote = True
    del plain

    future: Future[Any] = Future(name=name)
    config = current_config()
    if config.debug:
        note_forked(future, fork_site())
        watch_slow_forks()
    else:
        note_forked(future, None)
    native = _loops.running_native_loop()

    if config.eager and not is_async:
        _run_now(future, func, args, kwargs, False, contextvars.copy_context())
        try:
            return future
        finally:
            del future  # a failure's traceback keeps this frame alive (see _run_now)
    if not is_async:
        remote = _remote_call(func, args, kwargs) if may_be_remote else None
        if remote is not None:
            _submit_remote_fork(future, *remote)
        else:
            _submit_sync_fork(future, func, args, kwargs, contextvars.copy_context(), native)
        return future
    try:
        _start_coroutine_fork(future, func, args, kwargs, native, config.eager)
        return future
    finally:
        del future  # a failure's traceback keeps this frame alive (see _run_now)


def _start_coroutine_fork(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    native: object | None,
    eager: bool,
) -> None:
    """Run ``await func(*args, **kwargs)`` where a coroutine fork made here runs."""
    try:
        # A coroutine fork's task copies the context itself, when it is created here or when
        # its start is posted to the loop (anyio copies the posting context): no copy needed.
        group = _group_for_caller(native)
        if group is None and eager:
            # Eager mode runs a coroutine fork in the caller only where no loop is reachable:
            # one made on a loop, or from a loop's worker thread, needs that loop.
            _run_now(future, func, args, kwargs, True, contextvars.copy_context())
            return
        if group is not None:
            if group.spawn(future, func, args, kwargs):
                return
            # The scope captured in this context has closed: use the loop's ambient group.
            group = _ambient_for(group)
            if group.spawn(future, func, args, kwargs):
                return
            # The loop is no longer running (a sync fork outlived it): as from a thread with
            # no loop, so that the work still runs and the fork's result is kept.
        loop_group = background.loop_group()
        if loop_group is None:
            # Python 3.12 starts no thread once the interpreter is exiting, so the background
            # loop cannot start during the exit join: run the coroutine here.
            _run_now(future, func, args, kwargs, True, contextvars.copy_context())
            return
        if not loop_group.spawn(future, func, args, kwargs):
            # The background loop is gone (it failed): run the coroutine here rather than
            # leave its future pending forever.
            _run_now(future, func, args, kwargs, True, contextvars.copy_context())
    finally:
        # A failure's traceback keeps this frame alive (f_back of _run_now's).
        del future, func, args, kwargs


async def _await_returned(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return await coroutine


def _run_returned_coroutine(
    future: Future[Any], coroutine: Coroutine[Any, Any, Any], eager: bool
) -> None:
    """A sync fork returned a coroutine (``fork(lambda: fetch(1))``, or a ``def`` typed to
    return one): run it as a coroutine fork of the same future, where one made by the sync
    fork's caller would run, in the fork's context (its scope). Its type says
    ``Future[T]`` for a ``Callable[..., Coroutine[Any, Any, T]]``, and a checker cannot tell
    such a callable from an ``async def``: this makes the run time agree."""
    release_claim(future)  # a task's fork: cancellable until it ends, as any coroutine fork
    try:
        _start_coroutine_fork(
            future, _await_returned, (coroutine,), {}, _loops.running_native_loop(), eager
        )
    except BaseException as exc:  # it could not start (ShutdownError): the fork fails with it
        coroutine.close()
        settle_failed(future, without_catching_frame(exc))
    finally:
        del future, coroutine  # see _start_coroutine_fork


def _submit_sync_fork(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: contextvars.Context,
    native: object | None,
) -> None:
    """Send a sync fork to the worker pool, tied to the loop and scope it was made in.

    The loop (of this thread, or of the anyio or anyfork worker thread this is) goes with
    the job, so that inside it ``anyio.from_thread`` and new forks find that loop. A scope
    joins the fork; a fork made outside any scope is joined only at interpreter exit.
    """
    group = current_scope_group()
    token: EventLoopToken | None
    if group is not None and group.track_sync_fork(future):
        token = group.token
    elif native is not None:
        token = _loops.token_for(native)
    else:
        token = _loops.worker_thread_token()
    # The pool outlives loops: the exit join waits for the fork (the job tells it when its
    # work is over).
    exit_join.track(future, forget_when_done=False)
    job = _SyncJob((future, func, args, kwargs, context, capture_grad_mode(), token))
    attach(future, job)  # a blocking waiter may run it inline
    # On a loop's thread the job reaches the pool when the loop next gets control: a
    # blocking wait before that runs it in the caller, as torch.jit.wait does.
    submit_fork(job, native)


def _remote_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[RemoteCallable, tuple[Any, ...], dict[str, Any]] | None:
    """The remote callable behind ``func`` (itself, or under partials) with the arguments
    of the whole call; None for work that runs in this process."""
    if isinstance(func, RemoteCallable):
        return func, args, kwargs
    if not isinstance(func, functools.partial):
        return None
    while isinstance(func, functools.partial):
        args = (*func.args, *args)
        kwargs = {**func.keywords, **kwargs}
        func = func.func
    return (func, args, kwargs) if isinstance(func, RemoteCallable) else None


def _submit_remote_fork(
    future: Future[Any], remote: RemoteCallable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Send a fork of a remote callable away, counted by its scope and the exit join.

    Nothing is tracked if sending fails (arguments that cannot be sent): ``fork`` raises.
    """
    exit_join.check_open()  # no work goes out that nothing would wait for
    remote.fork_remotely(future, args, kwargs)
    group = current_scope_group()
    if group is not None:
        group.track_sync_fork(future)
    exit_join.track(future)


def _group_for_caller(native: object | None) -> ForkGroup | None:
    """The group a coroutine fork made here joins, or None where no loop runs."""
    group = current_scope_group()
    if group is not None:
        return group
    if native is not None:
        return ambient_group(native)
    token = _loops.worker_thread_token()
    if token is not None:
        return ambient_group(token.native_token, token)
    return None


def _ambient_for(group: ForkGroup) -> ForkGroup:
    return ambient_group(group.token.native_token, group.token)


class _SyncJob(Work):
    """A sync fork's work; the first thread to call it with the future still pending runs it:
    a worker of the pool or a waiter. ``grad_mode``, when torch is imported, runs the work in
    the grad and inference mode of the thread that forked it; ``token`` is the loop the fork
    belongs to.

    The thread that runs it takes the work out first, so once the work has run nothing holds
    the future or the work's arguments through the job: neither this object (kept by a
    worker queue or a waiter's frame) nor the frames of the threads that called it, which a
    failure's traceback keeps alive (see ``without_catching_frame``).
    """

    __slots__ = ("_parts",)

    stealable = True
    kind = "worker thread"

    def __init__(
        self,
        work: tuple[
            Future[Any],
            Callable[..., Any],
            tuple[Any, ...],
            dict[str, Any],
            contextvars.Context,
            Callable[..., Any] | None,
            EventLoopToken | None,
        ],
    ) -> None:
        self._parts: Any = work

    @property
    def taken(self) -> bool:
        """Whether a thread has run it (or it was cancelled before anyone did)."""
        parts = self._parts  # read once: a thread taking the job sets it to None
        return parts is None or parts[0].done()

    def steal(self) -> None:
        # On a loop's thread, only a fork made since the loop last got control runs in the
        # caller (forked and waited for with no await between them): which forks run there
        # then follows from the code, never from how fast a worker thread picked one up.
        if _loops.running_native_loop() is not None and not is_deferred(self):
            return
        self(inline=True)

    def awaited(self) -> None:
        hand_over(self)

    def cancel(self, future: Future[Any]) -> None:
        exit_join.discard(future)  # it will never run

    def __call__(self, inline: bool = False) -> None:
        """Run the work, unless it was cancelled or another thread took it.

        :param inline: a waiter runs it in its own thread; then a KeyboardInterrupt or
            SystemExit the work raises is re-raised to that waiter (after completing the
            future with it), since it is meant for the program, not for the fork
        """
        parts = self._parts
        if parts is None:  # another thread took it
            return
        if not claim(parts[0]):  # cancelled, or another thread took it
            # Only a fork that is over leaves the exit join here: one that another thread
            # is running stays tracked until that thread's run discards it.
            if parts[0].done():
                exit_join.discard(parts[0])
            return
        self._parts = None
        future, func, args, kwargs, context, grad_mode, token = parts
        del parts
        loop_claim = None
        if (
            token is not None
            and _loops.worker_thread_token() is not token
            and _loops.running_native_loop() is None  # not a waiter on a loop's thread
        ):
            loop_claim = _loops.WorkerThreadClaim(token)
        try:
            try:
                if grad_mode is None:
                    result = context.run(func, *args, **kwargs)
                else:
                    result = context.run(grad_mode, func, *args, **kwargs)
            except BaseException as exc:
                # Let go of the work's objects before completing: once the future is done
                # the program may exit, and a daemon thread that frees objects (a torch
                # tensor) while the interpreter finalizes can abort the process.
                del func, args, kwargs, context, grad_mode
                if inline and isinstance(exc, RuntimeError):
                    _explain_run_on_the_loop(exc, future)
                settle_failed(future, without_catching_frame(exc))
                if inline and isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            else:
                if type(result) is types.CoroutineType:
                    context.run(_run_returned_coroutine, future, result, False)
                    del func, args, kwargs, context, grad_mode, result
                    return
                del func, args, kwargs, context, grad_mode
                if isinstance(result, _ASYNC_RESULTS):
                    settle_failed(future, _not_a_sync_result(future, result))
                else:
                    settle(future, result)
        finally:
            exit_join.discard(future)
            if loop_claim is not None:
                loop_claim.release()
            del future


def _explain_run_on_the_loop(exc: RuntimeError, future: Future[Any]) -> None:
    """Say, on a RuntimeError of a sync fork that a blocking wait ran on a loop's thread,
    why calls that need a worker thread of the loop (``anyio.from_thread``, an SDK's
    ``asyncio.run``) fail there, and what to do instead."""
    if _loops.running_native_loop() is None:
        return
    note = (
        f"anyfork: {future.name} ran in the caller, on the event loop's thread: a blocking "
        "wait (anyfork.wait, Future.wait, wait_all) asked for it before the loop handed it "
        "to a worker thread. There, anyio.from_thread cannot reach the loop and asyncio.run "
        "cannot start one. Use 'await fut' (or 'await anyfork.wait_async(fut)') instead: it "
        "runs in a worker thread of the loop, as sync forks do."
    )
    notes: object = getattr(exc, "__notes__", None)
    if notes is None:  # set by hand on Python 3.10 (no add_note); exceptiongroup prints it
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]
        except AttributeError:  # pragma: no cover - an exception type with __slots__
            return
    if isinstance(notes, list):
        cast("list[str]", notes).append(note)


# What a sync fork must not return: only a task could await or iterate them.
_ASYNC_RESULTS = (types.CoroutineType, types.AsyncGeneratorType)


def _not_a_sync_result(future: Future[Any], result: Any) -> TypeError:
    """The error for a sync fork that returned a coroutine or an async generator, which
    only a task could use."""
    if inspect.iscoroutine(result):  # not a native coroutine (those run as tasks)
        result.close()
        return TypeError(
            f"{future.name} returned a coroutine-like object from a worker thread; declare "
            "it with 'async def' (or fork the coroutine function itself) so that anyfork "
            "runs it as a task"
        )
    return TypeError(  # an async generator
        f"{future.name} returned an async generator from a worker thread, which "
        "nothing there can iterate; fork a coroutine function that consumes it "
        "instead, e.g. 'async def collect(): return [item async for item in agen]'"
    )


def _run_now(
    future: Future[Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    context: contextvars.Context,
) -> None:
    try:
        try:
            if is_async:
                result = context.run(anyio.run, functools.partial(func, *args, **kwargs))
            else:
                result = context.run(func, *args, **kwargs)
        except BaseException as exc:
            settle_failed(future, without_catching_frame(exc))
        else:
            if not is_async and type(result) is types.CoroutineType:
                returned = cast("Coroutine[Any, Any, Any]", result)
                context.run(_run_returned_coroutine, future, returned, True)
            else:
                settle(future, result)
    finally:
        # A failure's traceback keeps this frame and fork()'s alive (f_back).
        del future, func, args, kwargs


# Code flags of functions whose call gives no result to wait for: an async generator, or a
# generator-based coroutine (@types.coroutine), which anyio cannot run as a task.
_GENERATOR_KINDS = inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _reject_generator_kinds(func: Callable[..., Any]) -> None:
    """Raise TypeError for an async generator function or a @types.coroutine generator.

    Plain generator functions stay allowed: a sync callable may return any object.
    """
    plain = getattr(func, "__func__", func)
    if type(plain) is not types.FunctionType:  # a partial, a callable object, a builtin
        target = unwrap_partial(func)
        plain = getattr(target, "__func__", target)
        if type(plain) is not types.FunctionType:
            call = getattr(type(target), "__call__", None)  # noqa: B004 - the method itself
            plain = getattr(call, "__func__", call)
            if type(plain) is not types.FunctionType:
                return
    flags = plain.__code__.co_flags
    if not flags & _GENERATOR_KINDS:
        return
    name = _name_of(func)
    if flags & inspect.CO_ASYNC_GENERATOR:
        raise TypeError(
            f"fork() takes a function that returns one result, but {name} is an async "
            "generator function: calling it gives an async generator, not a value to wait "
            f"for. Fork a coroutine function that consumes it instead, e.g. "
            f"'async def collect(): return [item async for item in {name}()]'"
        )
    raise TypeError(
        f"fork() cannot run {name}: it is a generator-based coroutine (@types.coroutine): "
        "declare it with 'async def', or fork an 'async def' function that does "
        f"'return await {name}(...)'"
    )


def _name_of(func: Callable[..., Any]) -> str:
    target = unwrap_partial(func)
    name = getattr(target, "__qualname__", None)
    if not isinstance(name, str):
        name = type(target).__qualname__
    return name
