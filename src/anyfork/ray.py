"""Fork onto a Ray cluster and get the same :class:`~anyfork.Future` back.

``pip install "anyfork[ray]"``. Mark a sync function with :func:`remote`; calling it runs
it here, forking it runs it as a Ray task::

    @anyfork.ray.remote(num_cpus=1)
    def simulate(seed: int) -> float: ...

    futures = [anyfork.fork(simulate, seed) for seed in range(100)]
    results = anyfork.wait_all(futures)

The first remote fork connects: to ``RAY_ADDRESS`` if it is set, else to an embedded local
Ray on this machine (see :func:`connect`). A fork runs at most once unless asked: Ray's
retries of crashed tasks are off by default (``remote(max_retries=...)``). The rest of
anyfork never imports ``ray``.

This module is the public face; the implementation is in three private modules, each on
top of the next: ``_ray_remote`` (remote functions), ``_ray_connection`` (the cluster that
remote forks go to, and the thread that starts Ray) and ``_ray_tasks`` (a remote fork as a
Ray task, followed to its end).
"""

from __future__ import annotations

from ._errors import RemoteImportError
from ._ray_connection import close, connect
from ._ray_remote import DEFAULT_MAX_RETRIES, RemoteFunction, remote

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "RemoteFunction",
    "RemoteImportError",
    "close",
    "connect",
    "remote",
]
