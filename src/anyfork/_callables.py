"""What kind of callable a user handed over: a coroutine function or not, under partials;
whether ``fork`` can run it at all, and the name its fork goes by.

``fork``, ``then``/``add_done_callback`` and ``anyfork.dask.remote`` all ask; this is the
one answer. Plain functions and bound methods are read off their code flags (``inspect``'s
checks cost several µs, on the hot path of every fork and every await); anything else,
functions marked with ``inspect.markcoroutinefunction`` included, goes through ``inspect``.
"""

from __future__ import annotations

import functools
import inspect
import types

__all__ = ["KnownKind", "is_coroutine_function", "kind_of_fork", "name_of", "unwrap_partial"]


class KnownKind:
    """A callable that knows its own kind of fork (an options-wrapped callable, see
    ``_options``): ``fork_kind`` is what :func:`kind_of_fork` returns for it."""

    __slots__ = ()

    fork_kind: tuple[bool, str, bool]


def is_coroutine_function(func: object) -> bool:
    """Whether calling ``func`` gives a coroutine: a coroutine function, a partial of one,
    or an object whose ``__call__`` is one."""
    plain = _plain_function(func)
    if plain is not None:
        return bool(plain.__code__.co_flags & inspect.CO_COROUTINE)
    func = unwrap_partial(func)
    if isinstance(func, KnownKind):
        return func.fork_kind[0]
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(type(func), "__call__", None)  # noqa: B004 - the method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


def _plain_function(func: object) -> types.FunctionType | None:
    """The Python function of a plain function or bound method, the common case, whose
    code flags say in one read what it is (``inspect``'s checks cost several µs a fork);
    ``None`` for anything else (partials, callable objects, builtins, functions marked
    with ``inspect.markcoroutinefunction``), which goes through the general checks."""
    plain = getattr(func, "__func__", func)
    if type(plain) is types.FunctionType and not hasattr(plain, "_is_coroutine_marker"):
        return plain
    return None


def unwrap_partial(func: object) -> object:
    """The callable under any ``functools.partial`` layers."""
    while isinstance(func, functools.partial):
        func = func.func
    return func


def kind_of_fork(func: object) -> tuple[bool, str, bool]:
    """What ``fork`` needs to know of ``func`` before routing it: whether it is a coroutine
    function, its name, and whether it may be a remote callable (anything but a plain
    function or bound method, which never are).

    :raises TypeError: if ``func`` is not callable, is a coroutine object, or is an async
        generator function or a ``@types.coroutine`` generator function (neither gives one
        result to wait for)
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
    plain = _plain_function(func)
    if plain is not None:
        flags = plain.__code__.co_flags
        if flags & _GENERATOR_KINDS:
            _reject_generator_kinds(func)
        return bool(flags & inspect.CO_COROUTINE), plain.__qualname__, False
    if isinstance(func, KnownKind):
        return func.fork_kind
    _reject_generator_kinds(func)
    return is_coroutine_function(func), name_of(func), True


def name_of(func: object) -> str:
    """The name a fork of ``func`` goes by: its qualified name, under partials."""
    target = unwrap_partial(func)
    name = getattr(target, "__qualname__", None)
    if not isinstance(name, str):
        name = type(target).__qualname__
    return name


# Code flags of functions whose call gives no result to wait for: an async generator, or a
# generator-based coroutine (@types.coroutine), which anyio cannot run as a task.
_GENERATOR_KINDS = inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _reject_generator_kinds(func: object) -> None:
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
    name = name_of(func)
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
