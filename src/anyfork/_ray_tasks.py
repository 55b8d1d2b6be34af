"""A remote fork as a Ray task: sent with ``.remote()``, run on a worker, followed to its end.

The lowest layer of ``anyfork.ray``: :func:`submit_task` sends one fork as a task that runs
:func:`run_on_worker`, attaches the work that cancels it, and follows its object ref. Ray
runs every ref's done callback on one C++ thread of its own, so the callback only hands the
fork's completion to anyfork's worker pool (never user code on Ray's thread, never behind
queued sync forks). Inside a Ray task, a blocking wait for a remote fork waits in
``ray.wait`` in the task's own thread, which is what makes Ray lend the task's CPU out.
"""

from __future__ import annotations

import functools
import importlib
import threading
from dataclasses import dataclass
from typing import Any

from . import _pool
from ._errors import RemoteImportError
from ._future import Future
from ._loops import running_native_loop
from ._state import Work, attach, settle, settle_failed
from ._torch import GradMode, run_in_grad_mode

__all__ = ["RemoteCall", "in_ray_worker", "run_on_worker", "submit_task"]

# Ray ships partial type hints: it is used through this untyped handle.
ray: Any = importlib.import_module("ray")


# --- on the worker -----------------------------------------------------------------------


class _TaskThread(threading.local):
    # True in the thread running a remote fork's task, while it runs it.
    running = False


_task_thread = _TaskThread()


def _loads(payload: bytes, what: str) -> Any:
    try:
        return ray.cloudpickle.loads(payload)
    except (ImportError, AttributeError) as exc:
        raise RemoteImportError(
            f"the Ray worker could not load {what}: {exc}. A worker imports a forked "
            "function (and the classes of its arguments) by module, as pickle does: install "
            "that module where the workers run (the same environment as here, or Ray's "
            "runtime_env), or define the function in the script you run (__main__), which "
            "is sent by value"
        ) from None


def run_on_worker(sent: tuple[bytes, bytes, GradMode | None]) -> Any:
    """The task a remote fork runs on a Ray worker (public for pickling by reference).

    It takes one argument, the call, because Ray serializes each argument on its own
    (three of them cost a fan-out of 200 forks a fifth more time)."""
    func, call, grad_mode = sent
    function = _loads(func, "the forked function")
    args, kwargs = _loads(call, f"the arguments of {getattr(function, '__qualname__', func)}")
    outer, _task_thread.running = _task_thread.running, True
    try:
        return run_in_grad_mode(grad_mode, function, args, kwargs)
    finally:
        _task_thread.running = outer


#: The one Ray remote function every remote fork runs (made without connecting to Ray).
ray_task: Any = ray.remote(run_on_worker)


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a remote fork here goes to its own cluster)."""
    return bool(ray.is_initialized()) and ray._private.worker.global_worker.mode == ray.WORKER_MODE


# --- one remote fork ---------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteCall:
    """One remote fork's call, ready to send: the function and its arguments pickled, the
    grad mode to run it in, the task (``ray_task`` with the function's Ray options), and the
    resources it asks for."""

    func: bytes
    call: bytes
    grad_mode: GradMode | None
    task: Any
    resources: dict[str, float]


def submit_task(future: Future[Any], remote_call: RemoteCall, *, nested: bool = False) -> None:
    """Send ``remote_call`` as a Ray task and complete ``future`` with its outcome.

    :param nested: the fork is made inside a Ray task: a blocking wait for it in the task's
        thread waits in ``ray.wait``, lending the task's CPU out meanwhile
    """
    ref = remote_call.task.remote((remote_call.func, remote_call.call, remote_call.grad_mode))
    work = _NestedRayWork(ref) if nested else _RayWork(ref)
    attach(future, work)
    if future.cancelled():  # cancelled while it was being sent: its cancel missed the task
        work.cancel(future)
        return
    ref.future().add_done_callback(functools.partial(_hand_off, future))


class _RayWork(Work):
    """Cancelling a remote fork asks Ray to cancel its task, without waiting: queued work
    never runs; running work gets ``KeyboardInterrupt`` in its thread (Ray's own cancel).
    The fork is cancelled at once either way, even if the task swallows the interrupt."""

    __slots__ = ("ref",)

    kind = "remote"

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def state(self, future: Future[Any]) -> str:
        # Sent to the cluster: when it starts there is Ray's business.
        return "running"

    def cancel(self, future: Future[Any]) -> None:
        try:
            ray.cancel(self.ref)
        except Exception:  # finished, or Ray is shut down: nothing is left to stop
            pass


class _NestedRayWork(_RayWork):
    """A remote fork made inside a Ray task: a blocking wait for it in the task's thread
    "steals" it by waiting in ``ray.wait``, which lends the task's CPU to other tasks (a
    wait on anything else would hold it, and nested fork-and-wait could deadlock)."""

    __slots__ = ()

    stealable = True

    def steal(self) -> None:
        if _task_thread.running and running_native_loop() is None:
            ray.wait([self.ref], num_returns=1, fetch_local=False)
        # Then the fork completes through its done callback, as any other.


# --- completing remote forks ------------------------------------------------------------


def _hand_off(future: Future[Any], done: Any) -> None:
    """On Ray's callback thread: hand the completion over at once, run nothing here."""
    job = functools.partial(_complete, future, done)
    try:
        _pool.worker_pool().hand_off(job)
    except RuntimeError:
        # No thread is idle and none can start (Python 3.12+ at exit): the job stays queued,
        # and a worker kept for exit (the connection made sure of one) runs it.
        pass


def _complete(future: Future[Any], done: Any) -> None:
    """Complete ``future`` with the outcome of its task (``done``, a concurrent future).

    A task's error arrives as Ray made it: ``RayTaskError(ValueError)`` is a ``ValueError``
    whose message holds the remote traceback. A cancelled fork stays cancelled.
    """
    try:
        value = done.result()
    except BaseException as exc:
        settle_failed(future, exc)
    else:
        settle(future, value)
