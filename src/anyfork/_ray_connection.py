"""The connection of ``anyfork.ray``: the Ray cluster that remote forks go to.

Ray's processes die with the thread that called ``ray.init``, so Ray is started and shut
down on one long-lived thread of anyfork's (:class:`_RayThread`), never on a loop's thread
or a pool's. :func:`connect` chooses the cluster (an address, ``RAY_ADDRESS``, a Ray you
initialised, or an embedded local Ray that anyfork owns and shuts down at exit, after the
exit join); :func:`close` closes it. :func:`submit` sends a fork to it, or, inside a Ray
task, to the task's own cluster.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _pool
from ._errors import WouldBlockError
from ._exit import StopAtExit, exit_join
from ._future import Future, block_until_done
from ._loops import running_native_loop
from ._ray_tasks import RemoteCall, in_ray_worker, ray, ray_task, submit_task
from ._state import InLine, attach, mark_retrieved, on_done, settle, settle_failed

__all__ = ["close", "connect", "submit"]


# --- the thread that starts and stops Ray -----------------------------------------------


class _RayThread:
    """The one thread that calls ``ray.init`` and ``ray.shutdown``, for the life of the
    process: Ray's child processes die with the thread that started them. A daemon, so it
    never holds the interpreter's exit; it exists from the first connection on, so on
    Python 3.12+ (no new thread at exit) it is there to shut Ray down at exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="anyfork-ray", daemon=True)
        self.thread.start()

    def call(self, job: Callable[[], Any], name: str) -> Future[Any]:
        """Run ``job`` on this thread after the jobs before it; a future of its outcome."""
        outcome: Future[Any] = Future(name=name)
        mark_retrieved(outcome)  # its failure is reported by whoever waits for it
        self._jobs.put((job, outcome))
        return outcome

    def _serve(self) -> None:
        while True:
            job, outcome = self._jobs.get()
            try:
                settle(outcome, job())
            except BaseException as exc:
                settle_failed(outcome, exc)
            del job, outcome


_thread_lock = threading.Lock()
_ray_thread: _RayThread | None = None


def _the_ray_thread() -> _RayThread:
    global _ray_thread
    with _thread_lock:
        if _ray_thread is None or not _ray_thread.thread.is_alive():
            _ray_thread = _RayThread()
        return _ray_thread


# --- the connection ----------------------------------------------------------------------

# A connection that failed fails remote forks at once for this many seconds; the first
# fork after that connects again (connect() tries at once). Documented in docs/ray.md.
_RETRY_AFTER = 5.0


def _closed_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"anyfork.ray closed before {what} finished: its Ray connection was closed "
        "(anyfork.ray.close(), or at exit)"
    )


class _Connection:
    """The Ray cluster remote forks go to, connected on the Ray thread: forks made
    meanwhile wait in line, and no event loop ever waits for the connection."""

    def __init__(self, address: str | None, init_options: dict[str, Any]) -> None:
        self._lock = threading.RLock()
        self.address = address
        self.init_options = init_options
        self.error: BaseException | None = None
        self.retry_at = 0.0
        self.up = False
        self.closed = False
        self._owns_ray = False  # a Ray the user initialised is never shut down by anyfork
        self._temp_dir: str | None = None
        #: the embedded cluster's resources: it never grows, so a larger request never runs
        self.embedded_resources: dict[str, float] | None = None
        self._in_line: dict[Future[Any], RemoteCall] = {}  # insertion-ordered
        self._pending: dict[Future[Any], None] = {}
        self.ready: Future[str] = Future(name="anyfork.ray connection")

    def start(self) -> None:
        _the_ray_thread().call(self._connect, "anyfork.ray connect")

    @property
    def failed(self) -> bool:
        return self.error is not None

    # --- on the Ray thread ----------------------------------------------------------------

    def _connect(self) -> None:
        try:
            address = self._init()
            # One task through it: exports the task function and starts a worker now, so
            # the first fork's .remote() does not wait for Ray on a loop's thread.
            ray.get(ray_task.options(max_retries=0).remote((_NO_OP, _NO_ARGS, None)), timeout=120)
            try:
                _pool.worker_pool().ensure_a_thread()  # completes forks, even at exit
            except RuntimeError:  # already exiting
                pass
        except BaseException as exc:
            with self._lock:
                self.error = exc
                self.retry_at = time.monotonic() + _RETRY_AFTER
                in_line, self._in_line = self._in_line, {}
            for future in in_line:
                settle_failed(future, _connect_error(self, exc))
            settle_failed(self.ready, exc)
            self._shut_down()
            return
        while True:  # hand the forks in line over, oldest first, then let callers submit
            with self._lock:
                in_line, self._in_line = self._in_line, {}
                if not in_line:
                    self.up = not self.closed
                    break
            for future, remote_call in in_line.items():
                if not future.done():  # else cancelled just before it left the line
                    self._send(future, remote_call)
        settle(self.ready, address)

    def _init(self) -> str:
        if ray.is_initialized():  # the user's Ray: used, never shut down
            return str(ray.get_runtime_context().gcs_address)
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        self._owns_ray = True
        if address is not None:
            ray.init(address=address, **self.init_options)
        else:
            options: dict[str, Any] = {
                "address": "local",  # never attach to a `ray start` cluster found by chance
                "include_dashboard": False,
                "num_cpus": os.cpu_count() or 1,
            }
            if "_temp_dir" not in self.init_options:
                self._temp_dir = options["_temp_dir"] = _short_temp_dir()
                # Registered before ray.init registers Ray's own shutdown at exit, so it runs
                # after it (atexit runs last in, first out): if the exit bound left no time
                # for the shutdown here, the directory is still removed once Ray's is over.
                atexit.register(shutil.rmtree, self._temp_dir, ignore_errors=True)
            options.update(self.init_options)
            ray.init(**options)
            self.embedded_resources = {
                name: float(amount) for name, amount in ray.cluster_resources().items()
            }
        return str(ray.get_runtime_context().gcs_address)

    def _shut_down(self) -> None:
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # --- forks ------------------------------------------------------------------------------

    def submit(self, future: Future[Any], remote_call: RemoteCall) -> None:
        if not self.ready.done() and running_native_loop() is None:
            # A thread with no running loop (a script) waits for the connection here, while
            # it may: on Python 3.12+ no thread can start once the script has ended, and
            # ray.init starts some.
            block_until_done(self.ready, None)
        with self._lock:
            if not self.ready.done() and not self.closed:
                self._in_line[future] = remote_call
                attach(future, InLine(self.leave_line))
                return
            error, closed = self.error, self.closed
        if error is not None:
            settle_failed(future, _connect_error(self, error))
        elif closed:
            settle_failed(future, _closed_error(future.name or "the fork"))
        else:
            self._send(future, remote_call)

    def _send(self, future: Future[Any], remote_call: RemoteCall) -> None:
        impossible = self._impossible(remote_call.resources)
        if impossible is not None:
            settle_failed(future, impossible)
            return
        with self._lock:
            if self.closed:
                settle_failed(future, _closed_error(future.name or "the fork"))
                return
            self._pending[future] = None
        try:
            submit_task(future, remote_call)
        except BaseException as exc:
            settle_failed(future, exc)
        on_done(future, self._forget)

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.pop(future, None)

    def leave_line(self, future: Future[Any]) -> None:
        """``future``, waiting in line, was cancelled: it is never sent."""
        with self._lock:
            self._in_line.pop(future, None)

    def _impossible(self, request: dict[str, float]) -> ValueError | None:
        """The error of a request the embedded cluster can never satisfy (Ray would keep
        it pending for ever, with only a log line), else None."""
        have = self.embedded_resources
        if have is None:  # a real cluster may grow (an autoscaler): Ray decides
            return None
        missing = {name: amount for name, amount in request.items() if amount > have.get(name, 0)}
        if not missing:
            return None
        offered = {name: amount for name, amount in have.items() if not name.startswith("node:")}
        return ValueError(
            f"anyfork.ray: the fork asks for {missing}, more than the embedded local Ray "
            f"has ({offered}), so Ray would keep it pending for ever. Ask for less, start "
            "the embedded Ray with more (anyfork.ray.connect(num_cpus=..., num_gpus=..., "
            "resources={...})), or connect to a cluster that has it (RAY_ADDRESS, "
            "anyfork.ray.connect(address))"
        )

    # --- close ------------------------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> None:
        """Fail the forks still pending, then shut down the Ray anyfork started, within
        ``timeout`` seconds if given (its share of the exit bound)."""
        with self._lock:
            self.closed, self.up = True, False
            pending = [*self._in_line, *self._pending]
            self._in_line, self._pending = {}, {}
        for future in pending:  # their refs would never complete once Ray is shut down
            settle_failed(future, _closed_error(future.name or "the fork"))
        done = _the_ray_thread().call(self._shut_down, "anyfork.ray shutdown")
        try:
            block_until_done(done, timeout)
        except TimeoutError:  # abandoned: Ray's processes end with this one
            pass


def _no_op() -> None:
    pass


_NO_OP: bytes = ray.cloudpickle.dumps(_no_op)
_NO_ARGS: bytes = ray.cloudpickle.dumps(((), {}))


def _short_temp_dir() -> str:
    """A fresh temporary directory for an embedded Ray: Ray puts Unix sockets in it, whose
    paths are limited, so it refuses one longer than 40 characters."""
    base = tempfile.gettempdir()
    if len(base) > 20 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="anyfork-ray-", dir=base)


def _connect_error(connection: _Connection, error: BaseException) -> BaseException:
    """A fork's own error for a failed connection (each fork its own object)."""
    where = connection.address or os.environ.get("RAY_ADDRESS") or "an embedded local Ray"
    left = max(connection.retry_at - time.monotonic(), 0)
    message = (
        f"anyfork.ray could not connect to {where} ({type(error).__name__}: {error}); the "
        f"first remote fork after {left:.1f} s tries again, or anyfork.ray.connect() at once"
    )
    fork_error = ConnectionError(message) if isinstance(error, OSError) else RuntimeError(message)
    fork_error.__cause__ = error
    return fork_error


# --- connect, close, and the exit -------------------------------------------------------

_lock = threading.RLock()
_connection: _Connection | None = None
_closed_by_user = False


def connect(address: str | None = None, **init_options: Any) -> Future[str]:
    """Choose the Ray cluster remote forks go to, and start connecting in the background.

    Optional: with no call, the first remote fork connects as ``connect()`` does. It never
    blocks: it returns a future of the cluster's address (``await`` it, ``wait`` it, or
    ignore it), and forks made before the connection is up wait in line. ``ray.init`` and
    ``ray.shutdown`` run on a long-lived thread of anyfork's (Ray's processes end with the
    thread that started them). A Ray that anyfork started is shut down at exit, after the
    exit join; a Ray you initialised with ``ray.init`` is used as it is, never shut down.

    :param address: a Ray cluster's address (``"ray://..."``, ``"10.0.0.5:6379"``,
        ``"auto"``), or ``None``: the cluster in ``RAY_ADDRESS`` if it is set, else an
        embedded local Ray (``address="local"``, no dashboard, sized to the cores, its
        temporary directory removed after)
    :param init_options: more arguments for ``ray.init`` (``num_cpus=``, ``num_gpus=``,
        ``resources=``, ``runtime_env=``...)
    :return: a future of the cluster's address (its GCS), failed if the connection fails
    :raises RuntimeError: if anyfork is connected, or connecting, elsewhere already (call
        :func:`close` first)
    :raises TypeError: for an ``address`` that is not a str

    Example::

        anyfork.ray.connect("ray://head.internal:10001")
    """
    global _connection, _closed_by_user
    if address is not None and not isinstance(address, str):
        raise TypeError(
            f"connect(): address= takes a Ray address (a str) or None, got "
            f"{type(address).__name__} {address!r}"
        )
    with _lock:
        current = _connection
        if current is not None and not current.closed and not current.failed:
            if address is None and not init_options:
                return current.ready
            raise RuntimeError(
                "anyfork.ray is connected (or connecting) already; call anyfork.ray.close() "
                "before connecting elsewhere"
            )
        _closed_by_user = False
        _connection = _start(_Connection(address, init_options))
        return _connection.ready


def _start(connection: _Connection) -> _Connection:
    exit_join.add_participant(_at_exit)  # raises ShutdownError once the exit join is over
    connection.start()
    return connection


def close() -> None:
    """Close the connection: pending remote forks fail, and the Ray anyfork started is shut
    down (never a Ray you initialised). Remote forks made later raise ``RuntimeError`` until
    :func:`connect` is called again. Blocks until done.

    :raises WouldBlockError: on an event loop's thread (use ``anyio.to_thread.run_sync``)
    """
    global _connection, _closed_by_user
    if running_native_loop() is not None:
        raise WouldBlockError(
            "anyfork.ray.close() blocks until Ray has shut down: call it from a thread, "
            "'await anyio.to_thread.run_sync(anyfork.ray.close)'"
        )
    with _lock:
        current, _connection = _connection, None
        _closed_by_user = True
    if current is not None:
        current.stop()


def _current_connection() -> _Connection:
    """The connection a remote fork goes to: the current one, or, with none (or a failed
    one past its back-off), a new one."""
    global _connection
    with _lock:
        if _closed_by_user:
            raise RuntimeError("anyfork.ray is closed: call anyfork.ray.connect() to connect again")
        current = _connection
        if current is not None and not current.closed:
            if not current.failed or time.monotonic() < current.retry_at:
                return current
            again = _Connection(current.address, current.init_options)
        else:
            again = _Connection(None, {})
        _connection = _start(again)
        return again


def _connection_now() -> _Connection | None:
    with _lock:
        return _connection


_at_exit = StopAtExit(_connection_now)  # it closes the connection after the exit join


def submit(future: Future[Any], remote_call: RemoteCall) -> None:
    """Send a remote fork to the connection, or, inside a Ray task, to the task's cluster.

    :raises RuntimeError: after :func:`close`, until :func:`connect`
    """
    if in_ray_worker():
        submit_task(future, remote_call, nested=True)
    else:
        _current_connection().submit(future, remote_call)
