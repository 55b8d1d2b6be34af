"""Fork onto a Dask cluster and get the same :class:`~anyfork.Future` back.

``pip install "anyfork[dask]"``. Mark a sync function with :func:`remote`; calling it runs
it here, forking it runs it on the cluster::

    @anyfork.dask.remote
    def simulate(seed: int) -> float: ...

    futures = [anyfork.fork(simulate, seed) for seed in range(100)]
    results = anyfork.wait_all(futures)

The first remote fork connects: to ``DASK_SCHEDULER_ADDRESS`` if it is set, else to an
embedded ``LocalCluster`` on this machine (see :func:`connect`). Importing this module
registers how a blocking wait inside a Dask task leaves the worker's thread pool; the rest
of anyfork never imports ``distributed``.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, overload

import cloudpickle  # type: ignore[import-untyped]
import dask.config
import distributed
import distributed.threadpoolexecutor
import distributed.utils
from typing_extensions import ParamSpec

from . import _pool
from ._errors import WouldBlockError
from ._exit import exit_join
from ._future import Future, Work, attach, block_until_done, settle, settle_failed
from ._loops import running_native_loop
from ._remote import RemoteCallable
from ._torch import GradMode, grad_mode_flags, run_in_grad_mode

__all__ = ["RemoteFunction", "RemoteImportError", "close", "connect", "remote"]

# distributed is only partly typed: its calls go through these untyped handles.
_Client: Any = distributed.Client
_LocalCluster: Any = distributed.LocalCluster
_secede: Any = distributed.secede
_get_client: Any = getattr(distributed, "get_client")  # noqa: B009
_config_get: Any = getattr(dask.config, "get")  # noqa: B009
_rejoin: Any = distributed.rejoin
_as_completed: Any = distributed.as_completed
# A task's thread: the worker's pool marks it (proceed), the worker its task (key).
_pool_thread_state: Any = getattr(distributed.threadpoolexecutor, "thread_state")  # noqa: B009
_task_thread_state: Any = getattr(distributed.utils, "thread_state")  # noqa: B009

P = ParamSpec("P")
T = TypeVar("T")


class RemoteImportError(ImportError):
    """A Dask worker could not load a forked function or its arguments."""


# --- remote functions --------------------------------------------------------------------


class RemoteFunction(RemoteCallable, Generic[P, T]):
    """A sync function that runs on the Dask cluster when forked, and here when called.

    Made by :func:`remote`; it keeps the function's signature, so ``anyfork.fork`` stays
    typed. It pickles by its module and name when that finds it again (a module-level
    ``@remote`` function), so that a task can fork it in turn.
    """

    def __init__(self, func: Callable[P, T], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, func)
        self._name: str = getattr(func, "__qualname__", repr(func))
        self._func = func
        self._options = options
        self._payload: bytes | None = None  # the function pickled, on first fork

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<anyfork.dask.remote {self._name!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        module = getattr(self, "__module__", None)
        name = getattr(self, "__qualname__", None)
        if module not in (None, "__main__") and _find(module, name) is self:
            return (_find, (module, name))
        return (RemoteFunction, (self._func, self._options))

    @property
    def func(self) -> Callable[P, T]:
        """The plain function: fork it to run it on this machine's worker pool instead."""
        return self._func

    @property
    def options(self) -> dict[str, Any]:
        """The Dask options of every fork: ``resources``, ``retries``, ``workers``,
        ``priority`` (a copy)."""
        return dict(self._options)

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._payload is None:
            # By module and name where that finds it, as pickle does (see __reduce__).
            self._payload = _dumps(self, f"the function {self._name}")
        call = _dumps((args, kwargs), f"the arguments of {self._name}")
        _submit(future, self._payload, call, grad_mode_flags(), self._options)


def _find(module: str | None, name: str | None) -> object:
    target: object = sys.modules.get(module or "")
    if target is None:
        import importlib

        target = importlib.import_module(module or "")
    for part in (name or "").split("."):
        target = getattr(target, part, None)
    return target


def _dumps(obj: object, what: str) -> bytes:
    try:
        return cloudpickle.dumps(obj)  # type: ignore[no-any-return]
    except Exception as exc:
        raise TypeError(
            f"anyfork.dask cannot send {what} to the cluster: {exc}. Everything a remote "
            "fork takes must pickle (no open files, locks, sockets or event loops); make "
            "such objects inside the function instead"
        ) from exc


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


_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "resources": (dict,),
    "retries": (int,),
    "workers": (str, list, tuple, set),
    "priority": (int,),
}


@overload
def remote(func: Callable[P, T], /) -> RemoteFunction[P, T]: ...


@overload
def remote(
    *,
    resources: dict[str, float] | None = None,
    retries: int | None = None,
    workers: str | Sequence[str] | None = None,
    priority: int | None = None,
) -> Callable[[Callable[P, T]], RemoteFunction[P, T]]: ...


def remote(
    func: Callable[..., Any] | None = None,
    /,
    *,
    resources: dict[str, float] | None = None,
    retries: int | None = None,
    workers: str | Sequence[str] | None = None,
    priority: int | None = None,
) -> Any:
    """Mark a sync function to run on the Dask cluster when forked.

    Used as a decorator, with or without options. Calling the result runs the function
    here; ``anyfork.fork(func, ...)`` runs it as a task on the cluster and returns the same
    :class:`~anyfork.Future` as any fork. Its arguments are pickled in the forking thread
    (an argument that cannot be pickled makes ``fork`` raise ``TypeError``), and the
    function is loaded on the workers by its module (defined in ``__main__``, by value).

    :param func: a sync callable
    :param resources: abstract resources a worker must have for the task, e.g.
        ``{"GPU": 1}`` (``dask worker --resources GPU=1``)
    :param retries: how many times Dask re-runs the task if it fails
    :param workers: the worker addresses (or names) allowed to run it
    :param priority: Dask's priority; higher runs first
    :return: a :class:`RemoteFunction`, or a decorator making one
    :raises TypeError: for a coroutine function (a Dask task runs in a thread with no
        event loop), a non-callable, or an option of the wrong type

    Example::

        @anyfork.dask.remote(resources={"GPU": 1}, retries=2)
        def embed(texts: list[str]) -> list[list[float]]: ...
    """
    options = {
        "resources": resources,
        "retries": retries,
        "workers": workers,
        "priority": priority,
    }
    for name, value in options.items():
        allowed = _OPTION_TYPES[name]
        if value is not None and not isinstance(value, allowed):
            raise TypeError(f"remote(): {name}= got {type(value).__name__} {value!r}")
    options = {name: value for name, value in options.items() if value is not None}

    def make(target: Callable[P, T]) -> RemoteFunction[P, T]:
        if not callable(target):
            raise TypeError(f"remote() takes a callable, got {type(target).__name__}")
        if _is_coroutine_function(target):
            raise TypeError(
                f"anyfork.dask.remote runs sync callables only, and "
                f"{getattr(target, '__qualname__', target)!r} is a coroutine function: a "
                "Dask task runs in a worker thread with no event loop to await it on. Fork "
                "it with anyfork.fork (it runs as a task here), or mark a sync function "
                "that calls anyio.run(...) on the worker"
            )
        return RemoteFunction(target, options)

    return make if func is None else make(func)


def _is_coroutine_function(func: object) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(type(func), "__call__", None)  # noqa: B004 - the method itself
    return call is not None and inspect.iscoroutinefunction(call)


# --- the connection ----------------------------------------------------------------------


def _no_op() -> None:
    pass


def _warm_up(client: Any, *, embedded: bool) -> None:
    """Start now the threads that would otherwise start on first use: for an embedded
    cluster, with one round trip through it (its in-process scheduler's offload thread),
    and a worker of anyfork's pool (to complete forks).

    On Python 3.12+ no thread can start once a script has ended, so a script's last forks,
    joined at exit, would find them missing: the task never runs, and the exit join waits
    out its bound. A real cluster's scheduler runs elsewhere, and may have no workers yet.
    """
    if embedded:
        client.submit(_no_op, pure=False).result(timeout=60)
    try:
        _pool.worker_pool().ensure_a_thread()
    except RuntimeError:  # already exiting: nothing more to prepare
        pass


class _Connection:
    """The client that remote forks go to, connected in a thread of its own: forks made
    meanwhile wait in line, and no event loop ever waits for the connection."""

    def __init__(self, target: object, cluster_options: dict[str, Any]) -> None:
        self._lock = threading.RLock()
        self._target = target
        self._cluster_options = cluster_options
        self.client: Any = None  # a distributed.Client once connected
        self._cluster: Any = None
        self._owns_client = not isinstance(target, distributed.Client)
        self._error: BaseException | None = None
        self._in_line: list[tuple[Future[Any], bytes, bytes, GradMode | None, dict[str, Any]]]
        self._in_line = []
        self.ready: Future[distributed.Client] = Future(name="anyfork.dask connection")
        self.closed = False

    def start(self) -> None:
        exit_join.add_participant(self)
        threading.Thread(target=self._connect, name="anyfork-dask-connect", daemon=True).start()

    def submit(
        self,
        future: Future[Any],
        func: bytes,
        call: bytes,
        grad_mode: GradMode | None,
        options: dict[str, Any],
    ) -> None:
        if self.client is None and running_native_loop() is None:
            # A thread with no running loop (a script) waits for the connection here, while
            # it may: on Python 3.12+ no thread can start once the script has ended, so a
            # script that forked just before its end would find its cluster unable to start.
            block_until_done(self.ready, None)
        with self._lock:
            client, error = self.client, self._error
            if client is None and error is None and not self.closed:
                self._in_line.append((future, func, call, grad_mode, options))
                return
        if client is None or self.closed:
            settle_failed(
                future,
                error
                or RuntimeError(
                    "anyfork.dask is closed: call anyfork.dask.connect() to connect again"
                ),
            )
            return
        if client.status in ("closing", "closed"):
            settle_failed(
                future,
                RuntimeError(
                    f"the Dask client of anyfork.dask is {client.status} (it lost its "
                    "scheduler and could not reconnect in time?): call anyfork.dask.close(), "
                    "then anyfork.dask.connect(), to connect again"
                ),
            )
            return
        _submit_to(client, future, func, call, grad_mode, options)

    def _connect(self) -> None:
        try:
            client, cluster = _open(self._target, self._cluster_options)
            _warm_up(client, embedded=cluster is not None)
        except BaseException as exc:
            with self._lock:
                self._error = exc
                in_line, self._in_line = self._in_line, []
            for future, *_ in in_line:
                settle_failed(future, exc)
            settle_failed(self.ready, exc)
            return
        self._cluster = cluster
        while True:  # hand the forks in line over, oldest first, then let callers submit
            with self._lock:
                in_line, self._in_line = self._in_line, []
                if not in_line:
                    self.client = client
                    break
            for future, func, call, grad_mode, options in in_line:
                try:
                    _submit_to(client, future, func, call, grad_mode, options)
                except BaseException as exc:
                    settle_failed(future, exc)
        settle(self.ready, client)
        if self.closed:
            self.stop()

    # --- the exit join's participant ------------------------------------------------------

    def pending_futures(self) -> list[Future[Any]]:
        return []  # every remote fork is tracked by the exit join itself

    def stop(self) -> None:
        """Close the client and the cluster this connection started (after the exit join)."""
        with self._lock:
            self.closed = True
            client, cluster, self._cluster = self.client, self._cluster, None
        if client is not None and self._owns_client:
            try:
                client.close(timeout=5)
            except Exception:  # already closed, or its scheduler is gone
                pass
        if cluster is not None:
            try:
                cluster.close(timeout=10)
            except Exception:
                pass


def _open(target: object, cluster_options: dict[str, Any]) -> tuple[distributed.Client, Any]:
    """Connect to ``target``: a client, an address, or None (the environment's scheduler,
    else an embedded LocalCluster)."""
    if isinstance(target, distributed.Client):
        return target, None
    address = target if target is not None else _config_get("scheduler-address", None)
    if address is not None:
        return _Client(address, set_as_default=False), None
    options: dict[str, Any] = {
        "processes": True,
        "host": "127.0.0.1",
        # The scheduler serves HTTP (health, metrics) even with no dashboard, on port 8787
        # unless told otherwise: a second cluster, or anything else there, would make it
        # warn and move. Port 0 takes a free one; dashboard=False keeps the dashboard off.
        "dashboard_address": ":0",
        "scheduler_kwargs": {"dashboard": False},
    }
    options.update(cluster_options)
    if options["processes"]:
        _check_main_guard()
    scratch = None
    if "local_directory" not in options and _config_get("temporary-directory", None) is None:
        # Dask would leave a dask-scratch-space directory in the working directory.
        scratch = options["local_directory"] = tempfile.mkdtemp(prefix="anyfork-dask-")
    try:
        cluster = _LocalCluster(**options)
    except BaseException:
        _remove(scratch)
        raise
    cluster_and_scratch = _OwnedCluster(cluster, scratch)
    try:
        return _Client(cluster, set_as_default=False), cluster_and_scratch
    except BaseException:
        cluster_and_scratch.close(timeout=10)
        raise


class _OwnedCluster:
    """A LocalCluster anyfork started, and the scratch directory it made for it."""

    def __init__(self, cluster: Any, scratch: str | None) -> None:
        self._cluster = cluster
        self._scratch = scratch

    def close(self, timeout: float) -> None:
        try:
            self._cluster.close(timeout=timeout)
        finally:
            _remove(self._scratch)


def _remove(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _check_main_guard() -> None:
    """Dask starts worker processes with ``spawn``, which imports the main script again:
    a script with no ``if __name__ == "__main__":`` would fork again in each of them."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:  # python -c, an interactive session, a notebook: nothing re-imported
        return
    try:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
    raise RuntimeError(
        f"anyfork.dask starts a local Dask cluster whose worker processes import {path} "
        "again (multiprocessing's spawn), and it has no 'if __name__ == \"__main__\":' "
        "block, so each of them would run the script's forks again. Put the script's code "
        "under 'if __name__ == \"__main__\":', or connect to a running cluster "
        "(DASK_SCHEDULER_ADDRESS, anyfork.dask.connect(address)), or start the local "
        "cluster with threads (anyfork.dask.connect(processes=False))"
    )


_lock = threading.RLock()
_connection: _Connection | None = None


def connect(
    address_or_client: str | distributed.Client | None = None, **cluster_options: Any
) -> Future[distributed.Client]:
    """Choose the cluster remote forks go to, and start connecting in the background.

    Optional: with no call, the first remote fork connects as ``connect()`` does. It never
    blocks: it returns a future of the ``distributed.Client`` (``await`` it, ``wait`` it,
    or ignore it), and forks made before the connection is up wait in line. A client or
    cluster that anyfork started is closed at exit, after the exit join.

    :param address_or_client: a scheduler address (``"tcp://10.0.0.5:8786"``), a
        ``distributed.Client`` of your own (never closed by anyfork), or ``None``: the
        scheduler in ``DASK_SCHEDULER_ADDRESS`` if it is set, else an embedded
        ``LocalCluster`` (processes, on 127.0.0.1, no dashboard, sized to the cores)
    :param cluster_options: arguments for that ``LocalCluster`` (``n_workers=``,
        ``threads_per_worker=``, ``processes=``, ``resources=``...)
    :return: a future of the client, failed if the connection fails
    :raises RuntimeError: if anyfork is connected already (call :func:`close` first)
    :raises TypeError: for cluster options together with an address or a client

    Example::

        anyfork.dask.connect("tcp://scheduler.internal:8786")
    """
    global _connection
    if cluster_options and address_or_client is not None:
        raise TypeError(
            "connect(): cluster options start an embedded LocalCluster; they do not apply "
            "to an address or a client"
        )
    with _lock:
        current = _connection
        if current is not None and not current.closed:
            if address_or_client is None and not cluster_options:
                return current.ready
            raise RuntimeError(
                "anyfork.dask is connected already; call anyfork.dask.close() before "
                "connecting elsewhere"
            )
        _connection = _Connection(address_or_client, cluster_options)
        _connection.start()
        return _connection.ready


def close() -> None:
    """Close the connection: the client and the cluster anyfork started (not a client you
    passed to :func:`connect`). Remote forks made later connect again. Blocks until done.

    :raises WouldBlockError: on an event loop's thread (use ``anyio.to_thread.run_sync``)
    """
    global _connection
    if running_native_loop() is not None:
        raise WouldBlockError(
            "anyfork.dask.close() blocks until Dask has closed: call it from a thread, "
            "'await anyio.to_thread.run_sync(anyfork.dask.close)'"
        )
    with _lock:
        current, _connection = _connection, None
    if current is not None:
        if not current.ready.done():
            current.ready.wait()  # let it finish connecting, then close it
        current.stop()


def _current_connection() -> _Connection:
    with _lock:
        if _connection is not None and not _connection.closed:
            return _connection
    connect()
    assert _connection is not None
    return _connection


# --- one remote fork ---------------------------------------------------------------------


def _submit(
    future: Future[Any],
    func: bytes,
    call: bytes,
    grad_mode: GradMode | None,
    options: dict[str, Any],
) -> None:
    worker_client = _worker_client()
    if worker_client is not None:  # inside a task: fork onto the same cluster
        _submit_to(worker_client, future, func, call, grad_mode, options)
    else:
        _check_not_importing_main()
        _current_connection().submit(future, func, call, grad_mode, options)


def _worker_client() -> Any:
    """The worker's own client (a distributed.Client) inside a Dask task, else None."""
    try:
        distributed.get_worker()
    except ValueError:
        return None
    return _get_client()


def _check_not_importing_main() -> None:
    # multiprocessing marks a spawned process while it imports the main script again.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "anyfork.dask: a remote fork was made while a new process imported the main "
            "script again (multiprocessing's spawn, as Dask starts its worker processes): "
            "put the script's forks under 'if __name__ == \"__main__\":'"
        )


def _submit_to(
    client: Any,  # a distributed.Client
    future: Future[Any],
    func: bytes,
    call: bytes,
    grad_mode: GradMode | None,
    options: dict[str, Any],
) -> None:
    # A unique key, and pure=False: Dask would otherwise run equal calls once.
    key = f"{future.name or 'fork'}-anyfork-{uuid.uuid4().hex}"
    dask_future = client.submit(
        run_on_worker, func, call, grad_mode, key=key, pure=False, **options
    )
    attach(future, _DaskWork(client, dask_future))
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


_pool.add_blocking_wait_hook(_secede_from_dask_task)
