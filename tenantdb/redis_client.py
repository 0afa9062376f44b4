"""Redis clients from tenantdb's Redis URLs (``redis://``, ``rediss://``, ``redis+unix://``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from .errors import ConfigurationError

__all__ = ["redis_client"]


def redis_client(url: str, /, **options: Any) -> redis.Redis:
    """A redis-py client for ``url``.

    ``redis+unix:///path/to.sock`` is the form ``limits`` understands for unix sockets (and
    the one ``tenantdb dev up`` prints); redis-py spells it ``unix://``, so it is mapped here.

    :raises ConfigurationError: a scheme that is neither of those nor ``redis://``/``rediss://``.
    """
    parts = urlsplit(url)
    if parts.scheme == "redis+unix":
        query = parse_qs(parts.query)
        db = int(query.get("db", ["0"])[0])
        return redis.Redis(unix_socket_path=parts.path, db=db, **options)
    if parts.scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, **options)
    raise ConfigurationError(
        f"{url!r}: Redis URLs are redis://host:port/db, rediss://... or redis+unix:///path"
    )
