"""PyTorch interop that never imports torch: torch futures in, grad mode into forks.

Everything here looks torch up in ``sys.modules``: if the program never imported torch,
none of it costs more than one dictionary lookup, and torch stays unimported.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ._foreign import follower_of
from ._future import Future
from ._state import keep_alive, mark_retrieved, settle, settle_failed

__all__ = [
    "GradMode",
    "TorchFuture",
    "capture_grad_mode",
    "follow_torch",
    "grad_mode_flags",
    "is_torch_future",
    "run_in_grad_mode",
]

T_co = TypeVar("T_co", covariant=True)


class TorchFuture(Protocol[T_co]):
    """What anyfork's wait functions need of a ``torch.futures.Future``, for type checkers."""

    def wait(self) -> T_co: ...

    def value(self) -> T_co: ...

    def done(self) -> bool: ...


def _torch() -> Any:
    return sys.modules.get("torch")


def is_torch_future(obj: object) -> bool:
    """Whether ``obj`` is a torch future: ``torch.futures.Future`` or its base ``torch._C.Future``.

    The base type is what ``torch.jit.fork``, ``Future.then``, ``torch.futures.collect_all``
    and ``torch.distributed.rpc`` return.
    """
    base = _base_future_type()
    return isinstance(base, type) and isinstance(obj, base)


def follow_torch(source: Any) -> Future[Any]:
    """An anyfork future that completes with the torch future ``source`` (its follower:
    one per torch future, however often it is waited on; see ``_foreign.py``).

    No thread waits: ``source``'s done callback (run by whichever torch thread completes it,
    or at once if it is done already) completes the anyfork future, and that wakes every
    waiter, blocking or awaiting, on any loop; a waiter whose loop has closed is skipped.
    Cancelling the anyfork future stops the waiting only: torch futures cannot be cancelled.
    """
    return follower_of(source, _make_follower)


def _make_follower(source: Any) -> Future[Any]:
    future: Future[Any] = Future(name=f"torch.Future at {id(source):#x}")
    # The torch future owns its error; the follower must not report it again when dropped.
    mark_retrieved(future)

    def copy_outcome(done: Any) -> None:
        try:
            value = done.value()
        except BaseException as exc:  # torch re-raises the stored error here
            settle_failed(future, exc)
        else:
            settle(future, value)

    if type(source) is _base_future_type() and not source.done():
        # Work running in torch's own pools (torch.jit.fork, then, collect_all). torch's
        # thread runs copy_outcome, then releases it, taking the GIL to do so; if the
        # interpreter is finalizing by then, that thread is killed and torch aborts the
        # process ("terminate called without an active exception"). So the exit join
        # waits, within its bound, until torch has released the callback, as long as
        # something consumes the follower (see ExitJoin.track_hand_off).
        # For the same reason torch's Python wrapper of the future must not be freed in
        # torch's thread: the follower keeps it, so a Python thread frees it.
        keep_alive(future, source)
        released: Future[None] = Future(name=f"{future.name} (its callback)")
        mark_retrieved(released)
        weakref.finalize(copy_outcome, settle, released, None)
        source.add_done_callback(copy_outcome)
        del copy_outcome  # torch holds the only reference now
        _hand_off_at_exit(future, released)
    else:
        source.add_done_callback(copy_outcome)
    return future


def _hand_off_at_exit(follower: Future[Any], released: Future[None]) -> None:
    from ._errors import ShutdownError
    from ._exit import exit_join

    try:
        exit_join.track_hand_off(follower, released)
    except (ShutdownError, RuntimeError):  # already exiting: nothing is left to join it
        pass


def _base_future_type() -> Any:
    torch = _torch()
    return getattr(getattr(torch, "_C", None), "Future", None)


GradModeRunner = Callable[..., Any]


def capture_grad_mode() -> GradModeRunner | None:
    """Capture the calling thread's grad and inference mode, if torch is imported.

    Returns a function ``run(func, *args, **kwargs)`` that calls ``func`` with that mode
    set in whatever thread it runs in, then restores the thread's own; ``None`` when torch
    has not been imported. This is what TorchScript's inter-op pool does for
    ``torch.jit.fork`` (pytorch issue 15802): grad mode is thread-local, so without it a
    fork made under ``torch.no_grad()`` would build autograd graphs in its worker thread.
    """
    torch = _torch()
    if torch is None:
        return None
    try:
        grad = bool(torch.is_grad_enabled())
        inference = bool(torch.is_inference_mode_enabled())
    except AttributeError:  # a module named torch that is not PyTorch, or one half imported
        return None

    def run_in_mode(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return func(*args, **kwargs)

    return run_in_mode


#: torch's grad and inference mode as two booleans: what travels to another process.
GradMode = tuple[bool, bool]


def grad_mode_flags() -> GradMode | None:
    """The calling thread's (grad enabled, inference mode) if torch is imported, else None.

    Plain booleans, so they pickle: a remote fork takes them to a Dask worker, where
    :func:`run_in_grad_mode` applies them.
    """
    torch = _torch()
    if torch is None:
        return None
    try:
        return bool(torch.is_grad_enabled()), bool(torch.is_inference_mode_enabled())
    except AttributeError:  # a module named torch that is not PyTorch, or one half imported
        return None


def run_in_grad_mode(
    flags: GradMode | None, func: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """Call ``func(*args, **kwargs)`` in the grad mode ``flags`` (None: as the thread is).

    Imports torch when the flags say it was imported where the fork was made: the worker
    process may not have imported it yet.
    """
    if flags is None:
        return func(*args, **kwargs)
    import importlib

    torch: Any = importlib.import_module("torch")
    grad, inference = flags
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return func(*args, **kwargs)
