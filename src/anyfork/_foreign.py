"""Foreign futures (``concurrent.futures``, torch) adapted into anyfork futures.

A foreign future gets one **follower**: an anyfork future completed by the foreign future's
done callback, which anyfork registers once, however many times the foreign future is
waited on, awaited or passed to ``collect_all``. Polling a pending foreign future with timed
waits therefore costs nothing per poll. The follower is no fork: nothing joins it at exit
(torch hand-offs aside, see ``_torch.py``), and ``anyfork.pending()`` does not list it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._future import Future
from ._state import Work, attach, mark_retrieved, settle, settle_cancelled, settle_failed

__all__ = ["follow_concurrent", "follower_of"]

# The follower of each foreign future adapted so far, both held weakly: while the foreign
# future is pending, its done callback keeps the follower alive; once it is done, a new
# follower is as good (the done callback of a done future runs at once and is not kept).
_followers: weakref.WeakKeyDictionary[Any, weakref.ref[Future[Any]]] = weakref.WeakKeyDictionary()
_lock = threading.RLock()


def follower_of(source: Any, make: Callable[[Any], Future[Any]]) -> Future[Any]:
    """The follower of ``source``, made by ``make(source)`` the first time (which registers
    its done callback); later calls return the same follower while it lives."""
    try:
        follower = _live(_followers.get(source))
    except TypeError:  # not weakly referenceable, or unhashable: adapt it every time
        return make(source)
    if follower is not None:
        return follower
    with _lock:
        follower = _live(_followers.get(source))
        if follower is None:
            follower = make(source)
            _followers[source] = weakref.ref(follower)
        return follower


def _live(ref: weakref.ref[Future[Any]] | None) -> Future[Any] | None:
    follower = None if ref is None else ref()
    # A follower cancelled by hand (one of collect_all's list) is not the source's outcome.
    if follower is None or follower.cancelled():
        return None
    return follower


def follow_concurrent(source: concurrent.futures.Future[Any]) -> Future[Any]:
    """The follower of a :class:`concurrent.futures.Future`."""
    return follower_of(source, _make_concurrent_follower)


def _make_concurrent_follower(source: concurrent.futures.Future[Any]) -> Future[Any]:
    future: Future[Any] = Future(name=repr(source))
    # The source future owns its errors; the adapter must not report them again when
    # garbage collected.
    mark_retrieved(future)

    def copy_outcome(done: concurrent.futures.Future[Any]) -> None:
        if done.cancelled():
            settle_cancelled(future)
        elif (exc := done.exception()) is not None:
            settle_failed(future, exc)
        else:
            settle(future, done.result())

    attach(future, _CancelSource(source))
    source.add_done_callback(copy_outcome)
    return future


class _CancelSource(Work):
    """Cancelling the follower of a ``concurrent.futures.Future`` cancels that future."""

    __slots__ = ("_source",)

    def __init__(self, source: concurrent.futures.Future[Any]) -> None:
        # Weakly: the follower must not keep its source (and its cache entry) alive.
        self._source = weakref.ref(source)

    def cancel(self, future: Future[Any]) -> None:
        source = self._source()
        if source is not None:
            source.cancel()
