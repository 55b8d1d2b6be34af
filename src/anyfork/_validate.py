"""Validation of the arguments every public entry point shares: one rule, one message.

The rule, for every argument that is a number of seconds (a wait's ``timeout``,
``configure(exit_timeout=...)``, a lifespan's ``grace_period``, ...) and for counts:
:class:`TypeError` for a value of the wrong type (a string, a bool), :class:`ValueError`
for a number of the right type but a wrong value (negative, NaN, zero where it must be
positive). A ``"5"`` read from a config file is a type error wherever it is passed. A flag
(``configure(eager=...)``, ``scope(cancel_pending=...)``, ...) is ``True`` or ``False``:
anything else, ``1`` or ``"yes"`` included, is a :class:`TypeError`.
"""

from __future__ import annotations

import math
import threading

__all__ = ["check_count", "check_flag", "check_seconds", "check_timeout"]


def check_seconds(
    value: object, name: str, *, allow_none: bool = False, positive: bool = False
) -> float | None:
    """Return ``value``, a number of seconds, or raise the error that names what is wrong.

    :param name: the argument's name, as the caller wrote it
    :param allow_none: ``None`` is allowed (it means "no bound")
    :param positive: zero is not allowed either
    :raises TypeError: if ``value`` is not an int or a float (a bool is not a number here)
    :raises ValueError: if ``value`` is NaN, negative, or zero with ``positive``
    """
    if value is None and allow_none:
        return None
    expected = (
        f"{'None or ' if allow_none else ''}a number of seconds{' > 0' if positive else ' >= 0'}"
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_count(value: object, name: str, *, minimum: int = 1) -> int:
    """Return ``value``, a whole number >= ``minimum``, or raise (same rule as seconds).

    :raises TypeError: if ``value`` is not an int (a bool, a float, a string)
    :raises ValueError: if ``value`` is below ``minimum``
    """
    expected = f"a whole number >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_flag(value: object, name: str) -> bool:
    """Return ``value``, a flag, or raise the error that names the argument.

    :param name: the argument's name, as the caller wrote it
    :raises TypeError: if ``value`` is not ``True`` or ``False`` (``1``, ``"yes"``, ``None``)
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_timeout(timeout: float | None) -> float | None:
    """Validate a wait's timeout and return the one to use: ``None`` for no bound.

    A timeout longer than a thread can wait (``threading.TIMEOUT_MAX``, some 292 years on
    Linux), ``inf`` included, means no bound: handed on, it would make lock waits off the
    main thread raise ``OverflowError``.
    """
    timeout = check_seconds(timeout, "timeout", allow_none=True)
    return None if timeout is None or timeout > threading.TIMEOUT_MAX else timeout
