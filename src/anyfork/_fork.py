"""``fork()``: the one place that decides where work runs.

=============================  ===========================  ==============================
caller                         coroutine function           sync callable
=============================  ===========================  ==============================
task on a running loop         task in innermost scope      the worker pool (``_sync_job``
                               (``_scope``), else the       over ``_pool``), from the
                               loop's ambient group         loop's next turn; the exit
                               (``_groups``)                join (``_exit``) tracks it
worker thread of a loop        the same, on that loop       the same
no loop                        the background loop          the same
                               (``_background``)
eager mode                     where no loop runs: run now  called now, in the caller
                               in the caller; else as above
any caller, a process function (not allowed)                a worker process (``_process``
(``anyfork.process``)                                       over ``_process_pool``, through
                                                            ``_remote``); scopes and the
                                                            exit join track it
any caller, a remote callable  (not allowed)                its cluster (``anyfork.dask``,
(``_remote.RemoteCallable``)                                through ``_remote``); scopes
                                                            and the exit join track it
any caller, an options-        one task (as above) that     one job per attempt (as above,
wrapped callable (``_options`` runs the attempts under      or its cluster), started once
``.WithOptions``)              the limit and deadline       the limit has a place
                               (``_attempts``)              (``_attempts``)
=============================  ===========================  ==============================

Each place owns its runner: ``_coroutine_fork`` (a task of a scope or loop, the background
loop, eager mode's run in the caller), ``_sync_job`` (the worker pool), ``_remote`` (a
worker process, a cluster). ``fork`` only checks the callable (``_callables``), makes the
future and picks the row. A new place for work to run is one new module (its runner with
it) plus one row in ``fork``'s routing table.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast, overload

from typing_extensions import ParamSpec

from . import _loops
from ._attempts import fork_with_options
from ._callables import kind_of_fork
from ._config import current_config
from ._coroutine_fork import run_now, start_coroutine_fork
from ._debug import fork_site, note_forked, watch_slow_forks
from ._future import Future
from ._options import WithOptions
from ._remote import remote_call, submit_remote_fork
from ._sync_job import submit_sync_fork

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
    is_async, name, may_be_remote = kind_of_fork(func)  # TypeError for what cannot run
    future: Future[Any] = Future(name=name)
    config = current_config()
    note_forked(future, fork_site() if config.debug else None)
    if config.debug:
        watch_slow_forks()
    native = _loops.running_native_loop()
    try:
        # The routing table: kind of callable -> the place it runs (its runner's module).
        if may_be_remote and type(func) is WithOptions:  # options -> its attempts (_attempts)
            fork_with_options(
                future, cast("WithOptions[..., Any]", func), args, kwargs, native, config.eager
            )
        elif is_async:  # coroutine function -> a task of the scope or loop, or the background loop
            start_coroutine_fork(future, func, args, kwargs, native, config.eager)
        elif config.eager:  # sync callable in eager mode -> now, in the caller
            run_now(future, func, args, kwargs, False, contextvars.copy_context())
        elif may_be_remote and (remote := remote_call(func, args, kwargs)) is not None:
            # process function or remote callable -> a worker process or its cluster
            submit_remote_fork(future, *remote)
        else:  # sync callable -> the worker pool (_sync_job)
            submit_sync_fork(future, func, args, kwargs, contextvars.copy_context(), native)
        return future
    finally:
        del future  # a failure's traceback keeps this frame alive (see run_now)
