"""The connection of ``anyfork.dask``: the client that remote forks go to.

:func:`connect` chooses it (an address, a client of yours, or an embedded ``LocalCluster``
that anyfork owns and closes at exit, after the exit join) and connects in a thread of its
own, while forks made meanwhile wait in line; a failed connection fails forks at once for
a back-off. :func:`close` closes it. :func:`submit` sends a fork to it, or, inside a Dask
task, to the worker's own client. Opening and closing what ``connect`` names, and the
checks against forking again in spawned worker processes, are ``_dask_cluster.py``'s.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import distributed

from . import _pool
from ._dask_cluster import (
    check_not_importing_main,
    check_target,
    describe,
    open_client,
    seconds_left,
)
from ._dask_tasks import RemoteCall, submit_to
from ._errors import WouldBlockError
from ._exit import StopAtExit, exit_join
from ._future import Future, block_until_done
from ._loops import running_native_loop
from ._state import InLine, attach, mark_retrieved, settle, settle_failed

__all__ = ["close", "connect", "submit"]

# distributed is only partly typed: its calls go through these untyped handles.
_get_client: Any = getattr(distributed, "get_client")  # noqa: B009


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


# After a failed connection, remote forks fail at once for a back-off that starts at
# _RETRY_FIRST seconds and doubles with each failure in a row, up to _RETRY_MOST; the
# first fork after it tries again (connect() tries at once). Documented in docs/dask.md.
_RETRY_FIRST = 2.0
_RETRY_MOST = 30.0


class _Connection:
    """The client that remote forks go to, connected in a thread of its own: forks made
    meanwhile wait in line, and no event loop ever waits for the connection. A connection
    that failed stays failed: :func:`_current_connection` replaces it after its back-off."""

    def __init__(self, target: object, cluster_options: dict[str, Any], failures: int = 0) -> None:
        self._lock = threading.RLock()
        self.target = target
        self.cluster_options = cluster_options
        self.client: Any = None  # a distributed.Client once connected
        self._cluster: Any = None
        self._owns_client = not isinstance(target, distributed.Client)
        self.error: BaseException | None = None
        #: failed connections in a row, this one included once it fails
        self.failures = failures
        self.retry_at = 0.0  # time.monotonic() after which a fork connects again
        self._in_line: dict[Future[Any], RemoteCall] = {}  # insertion-ordered
        self.ready: Future[distributed.Client] = Future(name="anyfork.dask connection")
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._connect, name="anyfork-dask-connect", daemon=True).start()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def submit(self, future: Future[Any], remote_call: RemoteCall) -> None:
        if self.client is None and running_native_loop() is None:
            # A thread with no running loop (a script) waits for the connection here, while
            # it may: on Python 3.12+ no thread can start once the script has ended, so a
            # script that forked just before its end would find its cluster unable to start.
            block_until_done(self.ready, None)
        with self._lock:
            client, error = self.client, self.error
            if client is None and error is None and not self.closed:
                self._in_line[future] = remote_call
                attach(future, InLine(self.leave_line))
                return
        if error is not None:
            settle_failed(future, self._retry_error(error))
            return
        if client is None or self.closed:
            settle_failed(
                future,
                RuntimeError(
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
        submit_to(client, future, remote_call)

    def leave_line(self, future: Future[Any]) -> None:
        """``future``, waiting in line, was cancelled: it is never sent."""
        with self._lock:
            self._in_line.pop(future, None)

    def _connect(self) -> None:
        try:
            client, cluster = open_client(self.target, self.cluster_options)
            _warm_up(client, embedded=cluster is not None)
        except BaseException as exc:
            with self._lock:
                self.failures += 1
                self.retry_at = time.monotonic() + self.back_off()
                self.error = exc
                in_line, self._in_line = self._in_line, {}
            for future in in_line:  # each its own error: waiters add to its traceback
                settle_failed(future, _copy_of(exc))
            settle_failed(self.ready, exc)
            return
        self._cluster = cluster
        while True:  # hand the forks in line over, oldest first, then let callers submit
            with self._lock:
                in_line, self._in_line = self._in_line, {}
                if not in_line:
                    self.client = client
                    break
            for future, remote_call in in_line.items():
                if future.done():  # cancelled just before it left the line
                    continue
                try:
                    submit_to(client, future, remote_call)
                except BaseException as exc:
                    settle_failed(future, exc)
        settle(self.ready, client)
        if self.closed:
            self.stop()

    def back_off(self) -> float:
        """How long forks fail at once after this failed connection."""
        return min(_RETRY_FIRST * 2.0 ** max(self.failures - 1, 0), _RETRY_MOST)

    def _retry_error(self, error: BaseException) -> BaseException:
        """A fork's own error, made during the back-off after a failed connection."""
        left = max(self.retry_at - time.monotonic(), 0)
        message = (
            f"anyfork.dask could not connect to {describe(self.target)} ({error}); it "
            f"tries again at the first remote fork after {left:.1f} s (a back-off of "
            f"{self.back_off():g} s), or at once on anyfork.dask.connect()"
        )
        retry_error = (
            ConnectionError(message) if isinstance(error, OSError) else RuntimeError(message)
        )
        retry_error.__cause__ = error
        return retry_error

    # --- at exit, or on close() -----------------------------------------------------------

    def stop(self, timeout: float | None = None) -> None:
        """Close the client and the cluster this connection started, within ``timeout``
        seconds if given (its share of the exit bound), else within Dask's own timeouts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self.closed = True
            client, cluster, self._cluster = self.client, self._cluster, None
        if client is not None and self._owns_client:
            try:  # at most half the time: the cluster needs the rest
                client.close(timeout=seconds_left(deadline, 5, share=0.5))
            except Exception:  # already closed, or its scheduler is gone
                pass
        if cluster is not None:
            cluster.close(deadline)


def _copy_of(error: BaseException) -> BaseException:
    """``error`` again, as an object of its own: an exception raised to many waiters
    collects every waiter's frames in its one traceback (and keeps them alive)."""
    try:
        duplicate = copy.copy(error)
    except Exception:
        duplicate = None
    if type(duplicate) is not type(error) or str(duplicate) != str(error):
        duplicate = RuntimeError(f"anyfork.dask could not connect: {error!r}")
        duplicate.__cause__ = error
        return duplicate
    assert duplicate is not None
    # Sharing the traceback is safe: raising the copy prepends frames of its own.
    duplicate.__traceback__ = error.__traceback__
    duplicate.__cause__, duplicate.__context__ = error.__cause__, error.__context__
    duplicate.__suppress_context__ = error.__suppress_context__
    return duplicate


_lock = threading.RLock()
_connection: _Connection | None = None


def connect(
    address_or_client: str | distributed.Client | None = None, **cluster_options: Any
) -> Future[distributed.Client]:
    """Choose the cluster remote forks go to, and start connecting in the background.

    Optional: with no call, the first remote fork connects as ``connect()`` does. It never
    blocks: it returns a future of the ``distributed.Client`` (``await`` it, ``wait`` it,
    or ignore it), and forks made before the connection is up wait in line. A client or
    cluster that anyfork started is closed at exit, after the exit join. A connection that
    failed is no connection: ``connect`` tries again at once, and so does the first remote
    fork after a back-off (2 s, doubling with each failure in a row, at most 30 s).

    :param address_or_client: a scheduler address (``"tcp://10.0.0.5:8786"``), a
        ``distributed.Client`` of your own (never closed by anyfork), or ``None``: the
        scheduler in ``DASK_SCHEDULER_ADDRESS`` if it is set, else an embedded
        ``LocalCluster`` (processes, on 127.0.0.1, no dashboard, sized to the cores)
    :param cluster_options: arguments for that ``LocalCluster`` (``n_workers=``,
        ``threads_per_worker=``, ``processes=``, ``resources=``...)
    :return: a future of the client, failed if the connection fails
    :raises RuntimeError: if anyfork is connected, or connecting, elsewhere already (call
        :func:`close` first)
    :raises TypeError: for an ``address_or_client`` of another type, or cluster options
        together with an address or a client
    :raises ValueError: for an address Dask cannot read

    Example::

        anyfork.dask.connect("tcp://scheduler.internal:8786")
    """
    global _connection
    check_target(address_or_client)
    if cluster_options and address_or_client is not None:
        raise TypeError(
            "connect(): cluster options start an embedded LocalCluster; they do not apply "
            "to an address or a client"
        )
    with _lock:
        current = _connection
        if current is not None and not current.closed and not current.failed:
            if address_or_client is None and not cluster_options:
                return current.ready
            raise RuntimeError(
                "anyfork.dask is connected (or connecting) already; call "
                "anyfork.dask.close() before connecting elsewhere"
            )
        _connection = _start(_Connection(address_or_client, cluster_options))
        return _connection.ready


def _start(connection: _Connection) -> _Connection:
    exit_join.add_participant(_at_exit)  # raises ShutdownError once the exit join is over
    connection.start()
    return connection


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
        block_until_done(current.ready, None)  # let it finish connecting, then close it
        current.stop()


def _current_connection() -> _Connection:
    """The connection a remote fork goes to: the current one, or, with none (or a failed
    one past its back-off), a new one. A failed connection within its back-off fails the
    fork at once."""
    global _connection
    with _lock:
        current = _connection
        if current is not None and not current.closed:
            if not current.failed or time.monotonic() < current.retry_at:
                return current
            again = _Connection(current.target, current.cluster_options, current.failures)
        else:
            again = _Connection(None, {})
        # Nobody holds this one's ready future: its failure is each fork's to report.
        mark_retrieved(again.ready)
        _connection = _start(again)
        return again


def _connection_now() -> _Connection | None:
    with _lock:
        return _connection


_at_exit = StopAtExit(_connection_now)  # it closes the connection after the exit join


# --- where a remote fork goes ------------------------------------------------------------


def submit(future: Future[Any], remote_call: RemoteCall) -> None:
    worker_client = _worker_client()
    if worker_client is not None:  # inside a task: fork onto the same cluster
        submit_to(worker_client, future, remote_call)
    else:
        check_not_importing_main()
        _current_connection().submit(future, remote_call)


def _worker_client() -> Any:
    """The worker's own client (a distributed.Client) inside a Dask task, else None."""
    try:
        distributed.get_worker()
    except ValueError:
        return None
    return _get_client()
