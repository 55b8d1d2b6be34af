"""Callables that run their forks somewhere else: on a cluster (``anyfork.dask``).

``fork`` routes a :class:`RemoteCallable` here instead of to the worker pool. The class is
all the core knows of clusters: an integration subclasses it and sends the work away in
:meth:`RemoteCallable.fork_remotely`; :func:`submit_remote_fork` then counts the fork in its
scope and in the exit join, as a sync fork is. Nothing here imports a cluster library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._exit import exit_join
from ._future import Future
from ._scope import current_scope_group

__all__ = ["RemoteCallable", "remote_call", "send_attempt", "submit_remote_fork"]


class RemoteCallable:
    """A callable whose forks run elsewhere; calling it directly runs it here."""

    __slots__ = ()

    def fork_remotely(
        self, future: Future[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Send one call away; it completes ``future`` (from a thread of anyfork's worker
        pool, never a cluster library's own loop) and attaches the :class:`Work` that
        cancels it.

        It raises, before sending anything, what makes the call impossible (arguments that
        cannot be sent): ``fork`` raises it to its caller.
        """
        raise NotImplementedError


def remote_call(
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


def submit_remote_fork(
    future: Future[Any], remote: RemoteCallable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Send a fork of a remote callable away, counted by its scope and the exit join.

    Nothing is tracked if sending fails (arguments that cannot be sent): ``fork`` raises.
    """
    send_attempt(future, remote, args, kwargs)
    group = current_scope_group()
    if group is not None:
        group.track_sync_fork(future)


def send_attempt(
    future: Future[Any], remote: RemoteCallable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Send one call away, counted by the exit join only: a fork of a remote callable, or
    one attempt of an options-wrapped one (``_attempts``, whose scope counts the fork)."""
    exit_join.check_open()  # no work goes out that nothing would wait for
    remote.fork_remotely(future, args, kwargs)
    exit_join.track(future)
