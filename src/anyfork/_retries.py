"""What the runners of options-wrapped forks share (``_attempts``, ``_sync_attempts``): the
state :func:`anyfork.pending` shows, which errors are retried, how the earlier attempts'
errors stay reachable, and the error of a fork past its deadline."""

from __future__ import annotations

from typing import Any

from ._errors import CancelledError
from ._future import Future
from ._limits import Limit
from ._options import WithOptions

__all__ = ["AttemptState", "chain_earlier", "retried", "timeout_error"]


class AttemptState:
    """What :func:`anyfork.pending` shows of a fork's attempts; for a coroutine fork under a
    limit, also its ticket (``None``: a place is held) until its task starts."""

    __slots__ = ("attempt", "pledge", "queued", "ticket")

    def __init__(self) -> None:
        self.attempt = 0  # the attempt running or last run (1 for the first)
        self.queued = False  # waiting in the limit's line
        self.ticket: Future[None] | None = None
        # Holds the limit until the fork's task or its future's done callback takes it out
        # (list.pop is atomic): whoever does gives the place back.
        self.pledge: list[Limit] = []

    def never_started(self, future: Future[Any]) -> None:
        """The fork is over: if its task never started, give back its place (or ticket)."""
        try:
            limit = self.pledge.pop()
        except IndexError:  # its task started: it gives the place back itself
            return
        ticket, self.ticket = self.ticket, None
        self.queued = False
        if ticket is None or not limit.leave_line(ticket):
            limit.release()


def timeout_error(options: WithOptions[..., Any]) -> TimeoutError:
    """The error of a fork that passed its deadline."""
    return TimeoutError(
        f"fork {options.name!r} did not finish by its deadline, {options.timeout} seconds "
        "after fork() (its timeout option)"
    )


def retried(options: WithOptions[..., Any], error: BaseException, attempt: int) -> bool:
    """Whether an attempt that failed with ``error`` runs again."""
    return (
        attempt <= options.retries
        and isinstance(error, options.retry_on)
        and not isinstance(error, CancelledError)
    )


def chain_earlier(error: BaseException, earlier: list[BaseException]) -> None:
    """Make the earlier attempts' errors reachable from the last one: each is the
    ``__context__`` at the end of the next one's chain, and a note lists them all."""
    if not earlier:
        return
    link = error
    for previous in reversed(earlier):
        seen = {id(link)}
        while link.__context__ is not None and id(link.__context__) not in seen:
            link = link.__context__
            seen.add(id(link))
        if id(previous) in seen:
            break  # the same object again: it is in the chain already
        link.__context__ = previous
        link = previous
    _add_note(
        error,
        f"anyfork: attempt {len(earlier) + 1} of {len(earlier) + 1}; the earlier attempts "
        f"failed with {', '.join(repr(e) for e in earlier)} (chained as __context__)",
    )


def _add_note(error: BaseException, note: str) -> None:
    notes: object = getattr(error, "__notes__", None)
    if notes is None:  # set by hand on Python 3.10 (no add_note)
        notes = []
        try:
            error.__notes__ = notes  # type: ignore[attr-defined,unused-ignore]
        except AttributeError:  # pragma: no cover - an exception type with __slots__
            return
    if isinstance(notes, list):
        notes.append(note)  # pyright: ignore[reportUnknownMemberType]
