"""What ``anyfork.dask.connect`` opens, and closes: a client for a scheduler address, a
client of the user's, or an embedded ``LocalCluster`` that anyfork owns.

The cluster anyfork starts it also closes, within the deadline the exit join gives it
(:class:`OwnedCluster`). The checks that keep a script from forking again in the worker
processes that import it (multiprocessing's spawn) are here too. ``_dask_connection.py``
holds the connection itself: forks waiting in line, the back-off after a failure.
"""

from __future__ import annotations

import ast
import asyncio
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import dask.config
import distributed
import distributed.comm
import distributed.comm.registry

__all__ = [
    "OwnedCluster",
    "check_main_guard",
    "check_not_importing_main",
    "check_target",
    "describe",
    "open_client",
    "seconds_left",
]

# distributed is only partly typed: its calls go through these untyped handles.
_Client: Any = distributed.Client
_LocalCluster: Any = distributed.LocalCluster
_config_get: Any = getattr(dask.config, "get")  # noqa: B009
_parse_address: Any = getattr(distributed.comm, "parse_address")  # noqa: B009
_get_backend: Any = getattr(distributed.comm.registry, "get_backend")  # noqa: B009


def seconds_left(deadline: float | None, default: float, share: float = 1.0) -> float:
    """``share`` of the seconds left until ``deadline`` (at most ``default``), for one Dask
    call's timeout: never zero, which Dask takes for "no timeout"; ``default`` with no
    deadline."""
    if deadline is None:
        return default
    return max(min((deadline - time.monotonic()) * share, default), 0.01)


def describe(target: object) -> str:
    if target is None:
        address = _config_get("scheduler-address", None)
        return str(address) if address is not None else "an embedded LocalCluster"
    return repr(target) if isinstance(target, str) else f"the client {target!r}"


def open_client(target: object, cluster_options: dict[str, Any]) -> tuple[distributed.Client, Any]:
    """Connect to ``target``: a client, an address, or None (the environment's scheduler,
    else an embedded LocalCluster)."""
    if isinstance(target, distributed.Client):
        return target, None
    address = target if target is not None else _config_get("scheduler-address", None)
    if address is not None:
        return _Client(address, set_as_default=False), None
    options: dict[str, Any] = {
        "processes": True,
        # The scheduler serves HTTP (health, metrics) even with no dashboard, on port 8787
        # unless told otherwise: a second cluster, or anything else there, would make it
        # warn and move. Port 0 takes a free one; dashboard=False keeps the dashboard off.
        "dashboard_address": ":0",
        "scheduler_kwargs": {"dashboard": False},
    }
    options.update(cluster_options)
    if options["processes"] or "protocol" in options:
        # Loopback only. Worker threads (processes=False) talk over the in-process
        # transport instead, which takes no host.
        options.setdefault("host", "127.0.0.1")
    if options["processes"]:
        check_main_guard()
    scratch = None
    if "local_directory" not in options and _config_get("temporary-directory", None) is None:
        # Dask would leave a dask-scratch-space directory in the working directory.
        scratch = options["local_directory"] = tempfile.mkdtemp(prefix="anyfork-dask-")
    try:
        cluster = _LocalCluster(**options)
    except BaseException:
        _remove(scratch)
        raise
    cluster_and_scratch = OwnedCluster(cluster, scratch)
    try:
        return _Client(cluster, set_as_default=False), cluster_and_scratch
    except BaseException:
        cluster_and_scratch.close(time.monotonic() + 10)
        raise


class OwnedCluster:
    """A LocalCluster anyfork started, and the scratch directory it made for it."""

    def __init__(self, cluster: Any, scratch: str | None) -> None:
        self._cluster = cluster
        self._scratch = scratch

    def close(self, deadline: float | None) -> None:
        """Close the cluster by ``deadline`` (else within Dask's own timeouts).

        Dask's cluster close gives a worker busy with a task 4 s to stop before its nanny
        kills it, and a cluster close cut short by its timeout stays "closing" until Dask's
        own exit hook waits 10 s more for it. So with a deadline the nannies close their
        workers first, within half the time left (at most Dask's usual time; a busy one is
        killed after 80% of its timeout), and what still has not closed at the deadline is
        killed and left to the OS.
        """
        try:
            if deadline is not None:
                workers = list(self._cluster.workers.values())
                # Nanny.kill takes up to 1.8 x its timeout; Dask gives it 5 s when time allows.
                grace = seconds_left(deadline, 9, share=0.5) / 1.8
                try:
                    self._cluster.sync(
                        _close_workers,
                        workers,
                        grace,
                        callback_timeout=seconds_left(deadline, 10, share=0.75),
                    )
                except Exception:  # timed out: what is left is killed below
                    pass
            try:
                self._cluster.close(timeout=seconds_left(deadline, 10))
            except Exception:  # timed out, or already closed
                pass
            if deadline is not None and _status(self._cluster) != "closed":
                for worker in list(self._cluster.workers.values()):
                    if isinstance(worker, distributed.Nanny):  # not a worker in this process
                        _kill(worker.pid)  # its worker process
                self._cluster.shutdown_on_close = False  # Dask's exit hook: 10 s more
        finally:
            _remove(self._scratch)


async def _close_workers(workers: list[Any], timeout: float) -> None:
    """On the cluster's loop: close its workers (nannies, or in-process workers) at once."""
    await asyncio.gather(
        *(worker.close(timeout=timeout) for worker in workers), return_exceptions=True
    )


def _status(cluster: Any) -> str | None:
    return getattr(getattr(cluster, "status", None), "name", None)


def _kill(pid: int | None) -> None:
    if pid is not None and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            pass


def _remove(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def check_main_guard() -> None:
    """Dask starts worker processes with ``spawn``, which imports the main script again:
    a script with no ``if __name__ == "__main__":`` would fork again in each of them."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:  # python -c, an interactive session, a notebook: nothing re-imported
        return
    try:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
    raise RuntimeError(
        f"anyfork.dask starts a local Dask cluster whose worker processes import {path} "
        "again (multiprocessing's spawn), and it has no 'if __name__ == \"__main__\":' "
        "block, so each of them would run the script's forks again. Put the script's code "
        "under 'if __name__ == \"__main__\":', or connect to a running cluster "
        "(DASK_SCHEDULER_ADDRESS, anyfork.dask.connect(address)), or start the local "
        "cluster with threads (anyfork.dask.connect(processes=False))"
    )


def check_target(target: object) -> None:
    if target is None or isinstance(target, distributed.Client):
        return
    if not isinstance(target, str):
        raise TypeError(
            "connect(): address_or_client= takes a scheduler address (a str such as "
            "'tcp://10.0.0.5:8786'), a distributed.Client or None, got "
            f"{type(target).__name__} {target!r}"
        )
    if not target.strip():
        raise ValueError(
            "connect(): address_or_client= is empty; pass a scheduler address such as "
            "'tcp://10.0.0.5:8786', or None for DASK_SCHEDULER_ADDRESS or an embedded cluster"
        )
    scheme, location = _parse_address(target)
    try:
        _get_backend(scheme)
    except ValueError as exc:
        raise ValueError(f"connect(): address_or_client={target!r}: {exc}") from None
    if not location:
        raise ValueError(
            f"connect(): address_or_client={target!r} names no host; pass a scheduler "
            "address such as 'tcp://10.0.0.5:8786'"
        )


def check_not_importing_main() -> None:
    # multiprocessing marks a spawned process while it imports the main script again.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "anyfork.dask: a remote fork was made while a new process imported the main "
            "script again (multiprocessing's spawn, as Dask starts its worker processes): "
            "put the script's forks under 'if __name__ == \"__main__\":'"
        )
