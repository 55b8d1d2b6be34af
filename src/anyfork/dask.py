"""Fork onto a Dask cluster and get the same :class:`~anyfork.Future` back.

``pip install "anyfork[dask]"``. Mark a sync function with :func:`remote`; calling it runs
it here, forking it runs it on the cluster::

    @anyfork.dask.remote
    def simulate(seed: int) -> float: ...

    futures = [anyfork.fork(simulate, seed) for seed in range(100)]
    results = anyfork.wait_all(futures)

The first remote fork connects: to ``DASK_SCHEDULER_ADDRESS`` if it is set, else to an
embedded ``LocalCluster`` on this machine (see :func:`connect`). Importing this module
registers how a blocking wait inside a Dask task leaves the worker's thread pool; the rest
of anyfork never imports ``distributed``.

This module is the public face; the implementation is in three private modules, each on
top of the next: ``_dask_remote`` (remote functions), ``_dask_connection`` (the client
that remote forks go to) and ``_dask_tasks`` (a remote fork as a Dask task, followed to
its end).
"""

from __future__ import annotations

from ._dask_connection import close, connect
from ._dask_remote import RemoteFunction, remote
from ._dask_tasks import RemoteImportError
from ._dask_tasks import run_on_worker as run_on_worker  # importable here, as before the split

__all__ = ["RemoteFunction", "RemoteImportError", "close", "connect", "remote"]
