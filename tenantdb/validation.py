"""Argument checks shared by every module: each rule is written once, here.

Each ``check_*`` returns the value in the type the caller goes on with, or raises
``ValueError`` whose message names the argument, what it must be, and what was given (cut
to :data:`SHOWN_CHARS` characters). Callers check before any SQL runs, so a refused
argument leaves nothing half-written. ``where`` prefixes the message with the call that
refused it (``"purge(): batch_size must be ..."``).

``bool`` is refused wherever a single number is asked for: ``True`` is an ``int`` to
Python, but ``limit=True`` is always a mistake. (Vectors are checked in C as a whole, and a
``True`` among 1,536 floats is read as ``1.0``.)
"""

from __future__ import annotations

import array
import functools
import math
import numbers
import re
import reprlib
import uuid
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone

__all__ = [
    "SHOWN_CHARS",
    "check_aware_datetime",
    "check_int",
    "check_optional_uuid",
    "check_positive_number",
    "check_positive_timedelta",
    "check_text",
    "check_uuid",
    "check_vector",
    "parse_aware_datetime",
    "parse_date",
    "parse_uuid",
]

#: The longest rendering of a refused value in a message.
SHOWN_CHARS = 60

# The spellings of a UUID accepted from text: 32 hex digits, hyphenated 8-4-4-4-12 or not,
# optionally in braces or after "urn:uuid:". uuid.UUID() alone also takes "0x...", "+...",
# underscores, surrounding spaces and non-ASCII digits (it strips hyphens and calls int()),
# none of which is a UUID.
_HEX = "[0-9a-fA-F]"
_UUID_DIGITS = (f"(?:{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
                f"|{_HEX}{{32}})")
_UUID_TEXT = re.compile(rf"(?:(?:urn:uuid:)?{_UUID_DIGITS}|\{{{_UUID_DIGITS}\}})")
# An ISO 8601 time with its UTC offset, in the form every supported Python parses alike
# (3.10's fromisoformat takes no "Z" and only 3 or 6 fraction digits; 3.11's takes more).
_AWARE_TIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[T ](?P<hour>\d{2}):(?P<minute>\d{2})"
    r"(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,6}))?)?"
    r"(?:(?P<utc>[Zz])|(?P<sign>[+-])(?P<off_hour>\d{2}):(?P<off_minute>[0-5]\d)"
    r"(?::(?P<off_second>[0-5]\d))?)",
    re.ASCII,
)
_AWARE_EXAMPLE = "e.g. 2026-05-01T09:00:00+00:00"
# float32 is what pgvector stores and computes in: a larger finite double would become
# infinite there, and a vector whose largest square is below the smallest normal float32
# loses its norm (pgvector divides by a norm computed in float32: 0 gives NaN distances).
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
# Renders a refused value without building the whole repr of a huge string or list.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_CHARS


# NUMBERS


def check_int(value: object, name: str, /, *, minimum: int | None = None,
              maximum: int | None = None, where: str | None = None,
              hint: str | None = None) -> int:
    """``value`` as an ``int`` within ``minimum``..``maximum`` (each inclusive, ``None``:
    unbounded). Integral types other than ``int`` (numpy's) come back as ``int``.

    :param name: the argument, for the message.
    :param where: the call, prefixed to the message (``"purge()"``).
    :param hint: appended to the message: what the value is for, or how to fix it.
    :raises ValueError: not an integer (a ``bool`` is not one here), or out of range.
    """
    if type(value) is int:  # the common case, before the slower ABC check
        number = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    else:
        number = None
    if number is not None and (minimum is None or number >= minimum) and (
            maximum is None or number <= maximum):
        return number
    raise ValueError(_message(where, f"{name} must be {_int_range(minimum, maximum)}", value,
                              hint))


def check_positive_number(value: object, name: str, /, *, unit: str | None = None,
                          where: str | None = None, hint: str | None = None) -> float:
    """``value`` (an ``int`` or ``float``, finite and above zero) as a ``float``.

    :param unit: what the number counts, for the message (``"days"``).
    :raises ValueError: not a real number (a ``bool`` is not one here), not finite, zero or
        below, or beyond a ``float``'s range.
    """
    what = f"a positive number of {unit}" if unit else "a positive number"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(_message(where, f"{name} must be {what} within a float's range",
                                      value, hint)) from None
        if math.isfinite(number) and number > 0:
            return number
    raise ValueError(_message(where, f"{name} must be {what}", value, hint))


def check_positive_timedelta(value: object, name: str, /, *, where: str | None = None,
                             hint: str | None = None) -> timedelta:
    """``value`` as a ``timedelta`` longer than zero.

    :raises ValueError: not a ``timedelta``, or zero or negative.
    """
    if isinstance(value, timedelta) and value > timedelta(0):
        return value
    raise ValueError(_message(where, f"{name} must be a positive timedelta", value, hint))


# TIMES


def check_aware_datetime(value: object, name: str, /, *, where: str | None = None) -> datetime:
    """``value`` as a timezone-aware ``datetime``.

    A naive time would be read in the database server's zone, whatever the caller meant.

    :raises ValueError: not a ``datetime`` (a ``date`` is not one), or naive.
    """
    if isinstance(value, datetime) and value.utcoffset() is not None:
        return value
    raise ValueError(_message(
        where, f"{name} must be a timezone-aware datetime (e.g. datetime.now(timezone.utc))",
        value, "a naive time would be read in the server's zone"))


def parse_aware_datetime(value: object, name: str, /, *, where: str | None = None) -> datetime:
    """``value``, an ISO 8601 text with its UTC offset (``Z`` for UTC), as an aware
    ``datetime``: ``2026-05-01T09:00:00.5+02:00``. Parsed alike on every supported Python.

    :raises ValueError: not such a text (no offset, another shape, an invalid date or time).
    """
    match = _AWARE_TIME.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        try:
            return _aware_datetime(match)
        except ValueError:
            pass  # a month 13, a 25th hour: refused below with the same message
    raise ValueError(_message(
        where, f"{name} must be an ISO 8601 time with its offset ({_AWARE_EXAMPLE})", value,
        "a time without one would be read in the server's zone"))


def parse_date(value: object, name: str, /, *, where: str | None = None) -> date:
    """``value``, an ISO 8601 date text (``2026-05-01``), as a ``date``.

    :raises ValueError: not such a text, or no such day.
    """
    if isinstance(value, str) and _DATE.fullmatch(value):
        try:
            return date(*(int(part) for part in value.split("-")))
        except ValueError:
            pass  # February 30th: refused below with the same message
    raise ValueError(_message(where, f"{name} must be an ISO 8601 date (e.g. 2026-05-01)",
                              value))


# UUIDS, TEXT AND VECTORS


def parse_uuid(value: object, /) -> uuid.UUID | None:
    """``value`` as a UUID (a ``uuid.UUID``, or its text: hyphenated or 32 hex digits,
    optionally in braces or after ``urn:uuid:``), else ``None``."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        return _uuid_from_text(value)
    return None


def check_uuid(value: object, name: str, /, *, where: str | None = None,
               hint: str | None = None) -> uuid.UUID:
    """``value`` as a UUID; see :func:`parse_uuid` for the accepted forms.

    :raises ValueError: anything else (``None``, bytes, an int, a malformed text).
    """
    parsed = parse_uuid(value)
    if parsed is None:
        raise ValueError(_message(where, f"{name} must be a UUID (uuid.UUID or its text)",
                                  value, hint))
    return parsed


def check_optional_uuid(value: object, name: str, /, *, where: str | None = None,
                        hint: str | None = None) -> uuid.UUID | None:
    """``None``, or ``value`` as a UUID (see :func:`parse_uuid`).

    :raises ValueError: neither.
    """
    if value is None:
        return None
    parsed = parse_uuid(value)
    if parsed is None:
        raise ValueError(_message(
            where, f"{name} must be a UUID (uuid.UUID or its text) or None", value, hint))
    return parsed


def check_text(value: object, name: str, /, *, where: str | None = None,
               hint: str | None = None, allow_empty: bool = False) -> str:
    """``value`` as a ``str`` with something in it besides whitespace (or, with
    ``allow_empty``, any ``str``).

    :raises ValueError: not a ``str``, or blank when it may not be.
    """
    if isinstance(value, str) and (allow_empty or value.strip()):
        return value
    what = "a string" if allow_empty else "a non-empty string"
    raise ValueError(_message(where, f"{name} must be {what}", value, hint))


def check_vector(values: object, name: str, /, *, dimensions: int) -> array.array[float]:
    """``values`` (a sequence of ``dimensions`` numbers, or a numpy array) as the float32
    values pgvector will hold.

    Every check runs in C over the whole vector (array, max, hypot): validating 1,536
    values one by one in Python cost more than the exact scan of a small org.

    :raises ValueError: not a sequence of numbers, another length, NaN or infinite values,
        or a norm float32 cannot hold (all zeros, too small, too large).
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of {dimensions} floats, "
                         f"got {type(values).__name__}")
    tolist = getattr(values, "tolist", None)  # numpy arrays: Python floats in one C call
    items = tolist() if callable(tolist) else values
    try:
        doubles = array.array("d", items if isinstance(items, Iterable) else values)
    except TypeError:
        culprit = next((v for v in values if not isinstance(v, numbers.Real)), None)
        raise ValueError(f"{name} holds a {type(culprit).__name__}: only numbers") from None
    if len(doubles) != dimensions:
        raise ValueError(f"{name} has {len(doubles)} dimensions, not {dimensions}: embed "
                         f"with a {dimensions}-dim model")
    stored = array.array("f", doubles)  # what pgvector will hold: beyond float32 is inf
    norm = math.hypot(*stored)  # NaN or inf if any value is
    if not math.isfinite(norm):
        raise ValueError(f"{name} holds NaN or infinite values (or beyond float32)")
    _check_norm(doubles, stored, norm, name)
    return stored


# HELPERS


def _check_norm(doubles: array.array[float], stored: array.array[float], norm: float,
                name: str) -> None:
    """Refuse a vector whose norm pgvector cannot compute in float32.

    pgvector stores float32 and sums squares in float32: a component below ~1.4e-45 becomes
    0, squares below ~1.2e-38 lose their precision and then vanish, and a sum of squares
    beyond ~3.4e38 is infinite. Either way the cosine distance is NaN (or the stored
    vector zero), so the largest square must be a normal float32 and the sum finite.
    """
    largest = max(map(abs, stored))
    if largest == 0.0 and not any(doubles):
        raise ValueError(f"{name} is all zeros: cosine distance to it is undefined")
    if largest * largest < _FLOAT32_MIN_NORMAL:
        raise ValueError(f"{name} is too small (largest |value| {largest:.3g}): its norm "
                         "underflows in float32 and cosine distances to it would be NaN; "
                         "normalise it to length 1")
    if norm * norm > _FLOAT32_MAX:
        raise ValueError(f"{name} is too large (norm {norm:.3g}): its squared norm "
                         "overflows float32; normalise it to length 1")


# Every tenant call parses its org: the same few texts, over and over. A hit costs a tenth
# of a parse; the bound keeps hostile input from growing it.
@functools.lru_cache(maxsize=1024)
def _uuid_from_text(text: str) -> uuid.UUID | None:
    return uuid.UUID(text) if _UUID_TEXT.fullmatch(text) else None


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    if minimum is not None:
        return f"an integer of at least {minimum}"
    if maximum is not None:
        return f"an integer of at most {maximum}"
    return "an integer"


def _message(where: str | None, rule: str, value: object, hint: str | None = None) -> str:
    prefix = f"{where}: " if where else ""
    suffix = f": {hint}" if hint else ""
    return f"{prefix}{rule}, got {_shown(value)}{suffix}"


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a refused 10 MB string must not become a 10 MB message."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a broken __repr__ must not hide the refusal
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _aware_datetime(match: re.Match[str]) -> datetime:
    """The ``datetime`` of a :data:`_AWARE_TIME` match; ``ValueError`` if out of range."""
    year, month, day = (int(part) for part in match["date"].split("-"))
    offset = timedelta(0)
    if match["sign"]:
        offset = timedelta(hours=int(match["off_hour"]), minutes=int(match["off_minute"]),
                           seconds=int(match["off_second"] or 0))
        offset = -offset if match["sign"] == "-" else offset
    fraction = (match["fraction"] or "").ljust(6, "0")
    return datetime(year, month, day, int(match["hour"]), int(match["minute"]),
                    int(match["second"] or 0), int(fraction),
                    tzinfo=timezone(offset))
