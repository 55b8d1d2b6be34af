"""Callables that run their forks somewhere else: on a cluster (``anyfork.dask``).

``fork`` routes a :class:`RemoteCallable` here instead of to the worker pool. The class is
all the core knows of clusters: an integration subclasses it and sends the work away in
:meth:`RemoteCallable.fork_remotely`; ``fork`` then counts the fork in its scope and in the
exit join, as it does a sync fork. Nothing here imports a cluster library.
"""

from __future__ import annotations

from typing import Any

from ._future import Future

__all__ = ["RemoteCallable"]


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
