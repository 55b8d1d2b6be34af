"""What kind of callable a user handed over: a coroutine function or not, under partials.

``fork``, ``then``/``add_done_callback`` and ``anyfork.dask.remote`` all ask; this is the
one answer. Plain functions and bound methods are read off their code flags (``inspect``'s
checks cost several µs, on the hot path of every fork and every await); anything else,
functions marked with ``inspect.markcoroutinefunction`` included, goes through ``inspect``.
"""

from __future__ import annotations

import functools
import inspect
import types

__all__ = ["is_coroutine_function", "unwrap_partial"]


def is_coroutine_function(func: object) -> bool:
    """Whether calling ``func`` gives a coroutine: a coroutine function, a partial of one,
    or an object whose ``__call__`` is one."""
    plain = getattr(func, "__func__", func)
    if type(plain) is types.FunctionType and not hasattr(plain, "_is_coroutine_marker"):
        return bool(plain.__code__.co_flags & inspect.CO_COROUTINE)
    func = unwrap_partial(func)
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(type(func), "__call__", None)  # noqa: B004 - the method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


def unwrap_partial(func: object) -> object:
    """The callable under any ``functools.partial`` layers."""
    while isinstance(func, functools.partial):
        func = func.func
    return func
