"""The worker process of ``anyfork.process``: what runs on the other side of the pipe.

The pool (``_process_pool``) starts each worker as a fresh interpreter (spawn, never a plain
``fork`` of the threaded parent) that runs :func:`serve`: it reads one call at a time from
its socket, runs it and sends back the outcome. It never re-runs the parent's ``__main__``
(multiprocessing's spawn and forkserver do): functions defined there arrive by value
(cloudpickle).

A worker ignores Ctrl-C (a terminal sends SIGINT to the whole process group: the parent
decides what stops), and ends when its socket closes (the pool let it go) or when its
lifeline closes (the parent died, even by SIGKILL: no orphan keeps running a fork).
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

__all__ = ["serve"]

# Loaded functions, by their pickled form: a fan-out of one function loads it once.
_MOST_FUNCTIONS_KEPT = 64


def serve(fd: int, lifeline: int) -> None:
    """Run calls read from the socket ``fd`` until it closes (the worker's main; its
    ``sys.path`` is the parent's already, so module-level functions load as they do there)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with_parent, args=(lifeline,), daemon=True).start()
    conn = Connection(fd)
    functions: dict[bytes, Any] = {}
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):  # the pool let this worker go
            return
        conn.send_bytes(_run(request, functions))
        del request


def _run(request: bytes, functions: dict[bytes, Any]) -> bytes:
    try:
        func_bytes, call_bytes, grad_mode = pickle.loads(request)
        func = functions.get(func_bytes)
        if func is None:
            func = pickle.loads(func_bytes)
            if len(functions) >= _MOST_FUNCTIONS_KEPT:
                functions.clear()
            functions[func_bytes] = func
        args, kwargs = pickle.loads(call_bytes)
        from ._torch import run_in_grad_mode

        value = run_in_grad_mode(grad_mode, func, args, kwargs)
    except BaseException as exc:  # the fork's own error, SystemExit included
        return _error_reply(exc)
    try:
        # cloudpickle: an instance of a class defined in the parent's __main__ goes back as
        # that very class (cloudpickle tracks the classes it sent by value).
        return cloudpickle.dumps(("value", value))  # type: ignore[no-any-return]
    except BaseException as exc:
        error = TypeError(
            f"the result of {getattr(func, '__qualname__', func)!r} cannot be pickled to go "
            f"back from its worker process: {exc}. Return plain data (numbers, strings, "
            "lists, dicts, arrays, tensors) instead"
        )
        return _error_reply(error)


def _error_reply(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None  # frames do not pickle; their text goes along instead
    try:
        return cloudpickle.dumps(("error", exc, text))  # type: ignore[no-any-return]
    except BaseException:  # an exception that does not pickle: its type, message and text
        return cloudpickle.dumps(("lost", f"{type(exc).__qualname__}: {exc}", text))  # type: ignore[no-any-return]


def _end_with_parent(lifeline: int) -> None:
    # The parent holds the pipe's other end: reading returns only once it is gone.
    try:
        while os.read(lifeline, 1):
            pass
    except OSError:
        pass
    os._exit(1)
