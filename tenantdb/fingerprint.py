"""Request fingerprints and bounded JSON: pure functions, no database, no framework.

:func:`fingerprint` hashes a request's body (and the headers named) canonically, so that
a retry with the same payload in another key order or spacing matches the first request.
Every JSON value that enters tenantdb from a client passes :func:`check_json` or
:func:`canonical_json` first: at most :data:`MAX_JSON_DEPTH` levels of nesting and
:data:`MAX_JSON_BYTES` bytes. Python's json module recurses once per level, so a body
nested 10,000 deep (about 20 KB on the wire) would otherwise end in ``RecursionError``;
here it is a ``ValueError`` naming the limit, raised before any hashing or SQL.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "Fingerprint",
    "canonical_json",
    "check_json",
    "fingerprint",
    "parse_json",
]

#: Deepest nesting of arrays and objects accepted in a JSON body (the top level is 1).
MAX_JSON_DEPTH = 64
#: Largest JSON body accepted, in bytes of UTF-8 (1 MiB).
MAX_JSON_BYTES = 1024 * 1024


class Fingerprint(NamedTuple):
    """The two hashes a claim stores: ``body_hash, headers_hash = fingerprint(...)``."""

    body_hash: str
    headers_hash: str


def fingerprint(
    body: Any,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    include: Iterable[str] = (),
) -> Fingerprint:
    """Hash a request canonically: sha256 hex of its body and of the headers named.

    A body given as ``str``/``bytes`` that parses as JSON, or as Python values, hashes as
    canonical JSON: key order and whitespace do not matter (``1`` and ``1.0`` do). Any
    other ``str``/``bytes`` hashes as its UTF-8 bytes; ``None`` as an empty body. Only the
    headers named in ``include`` count, names case-insensitive, values stripped, repeated
    headers in their order; with no ``include`` the headers hash is ``""``.

    :raises ValueError: a body that is neither text nor JSON-serialisable (NaN, sets ...),
        larger than :data:`MAX_JSON_BYTES` or nested deeper than :data:`MAX_JSON_DEPTH`.
    """
    return Fingerprint(_body_hash(body), _headers_hash(headers, include))


def check_json(value: Any, what: str = "JSON value") -> None:
    """Refuse a Python value nested deeper than :data:`MAX_JSON_DEPTH`, without recursion.

    :raises ValueError: naming ``what`` and the limit.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{what} is nested deeper than MAX_JSON_DEPTH={MAX_JSON_DEPTH} "
                             "levels of arrays and objects; flatten it")
        stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes | str, what: str = "body") -> Any:
    """Parse JSON text within :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH`.

    :raises ValueError: not JSON, too large or too deep (``json.JSONDecodeError`` for
        text that is not JSON, itself a ``ValueError``).
    """
    data = raw.encode() if isinstance(raw, str) else raw
    _check_size(len(data), what)
    # The depth is checked on the text before parsing: the parser recurses per level.
    _check_text_depth(data, what)
    return json.loads(data)


def canonical_json(value: Any, what: str = "JSON value") -> str:
    """``value`` as canonical JSON text (sorted keys, no spaces), within both limits.

    :raises ValueError: not JSON-serialisable, too deep or too large.
    """
    check_json(value, what)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    _check_size(len(text.encode()), what)
    return text


# PRIVATE HELPERS

_OPENERS = frozenset(b"[{")
_CLOSERS = frozenset(b"]}")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


def _check_size(size: int, what: str) -> None:
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{what} is {size} bytes, over MAX_JSON_BYTES={MAX_JSON_BYTES}; "
                         "send a smaller body")


def _check_text_depth(data: bytes, what: str) -> None:
    # Only brackets outside strings count. A cheap pre-check: text with fewer brackets
    # than the limit cannot exceed it.
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"{what} is nested deeper than MAX_JSON_DEPTH="
                                 f"{MAX_JSON_DEPTH} levels of arrays and objects; flatten it")
        elif byte in _CLOSERS:
            depth -= 1


def _body_hash(body: Any) -> str:
    if body is None:
        body = b""
    if isinstance(body, str | bytes | bytearray):
        raw = body.encode() if isinstance(body, str) else bytes(body)
        _check_size(len(raw), "body")
        try:
            _check_text_depth(raw, "body")
            value = json.loads(raw)
        except json.JSONDecodeError:
            return _sha256(b"raw:" + raw)
        except UnicodeDecodeError:
            return _sha256(b"raw:" + raw)
        return _sha256(b"json:" + canonical_json(value, "body").encode())
    return _sha256(b"json:" + canonical_json(body, "body").encode())


def _headers_hash(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None, include: Iterable[str]
) -> str:
    wanted = {name.strip().lower() for name in include}
    if not wanted:
        return ""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    kept: dict[str, list[str]] = {}
    for name, value in pairs:
        if name.strip().lower() in wanted:
            kept.setdefault(name.strip().lower(), []).append(value.strip())
    return _sha256(canonical_json(sorted(kept.items()), "headers").encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
