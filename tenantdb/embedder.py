"""Embedders: text to vectors. The default needs no network and no model download.

:class:`HashingEmbedder` hashes words and word pairs into a fixed number of signed buckets
and L2-normalises the result: deterministic across processes and machines, and texts that
share words land near each other, which is all seeds and tests need. Anything with an
``embed`` method, a ``dimensions`` and a ``name`` plugs in (:class:`Embedder`).

Every stored vector records its embedder's ``name`` (``embedding.model``), so a search by
text finds the embedder again by that name: :func:`register_embedder` makes an embedder
findable by :func:`get_embedder` in this process (``add_knowledge`` registers the ones it
uses; the hashing embedders are always found).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .validation import check_int

__all__ = ["Embedder", "HashingEmbedder", "default_embedder", "get_embedder",
           "register_embedder"]

_WORD = re.compile(r"[a-z0-9]+")
_HASHING_NAME = re.compile(r"tenantdb-hashing-([1-9][0-9]{0,5})")
_registry: dict[str, Embedder] = {}
_registry_lock = threading.Lock()


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of ``dimensions`` floats."""

    @property
    def dimensions(self) -> int: ...

    @property
    def name(self) -> str: ...

    def embed(self, texts: Sequence[str], /) -> list[list[float]]: ...


class HashingEmbedder:
    """Signed feature hashing of words and word pairs, L2-normalised.

    :param dimensions: length of each vector (1536 to match ``embedding.vector``).
    """

    def __init__(self, dimensions: int = 1536) -> None:
        self._dimensions = check_int(dimensions, "dimensions", minimum=1)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def name(self) -> str:
        return f"tenantdb-hashing-{self._dimensions}"

    def embed(self, texts: Sequence[str], /) -> list[list[float]]:
        """One unit vector per text (an empty text included)."""
        return [self._embed_one(text) for text in texts]

    def _embed_one(self, text: str) -> list[float]:
        words = _WORD.findall(text.lower())
        features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        vector = [0.0] * self._dimensions
        for feature in features or [""]:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "big") % self._dimensions
            vector[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        if norm == 0.0:  # features cancelled out; any fixed unit vector keeps it valid
            vector[0], norm = 1.0, 1.0
        return [v / norm for v in vector]


def default_embedder() -> Embedder:
    """The embedder seeds use when none is given: :class:`HashingEmbedder` (1536 dims)."""
    return HashingEmbedder()


def register_embedder(embedder: Embedder, *, replace: bool = False) -> None:
    """Make ``embedder`` findable by its ``name`` (:func:`get_embedder`) in this process.

    Registering the same object again is a no-op.

    :param replace: let ``embedder`` take the place of another one of the same name.
    :raises ValueError: ``embedder`` has no non-empty text ``name``, or another embedder
        already has that name (pass ``replace=True`` if that is meant).
    """
    name = getattr(embedder, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"an embedder needs a non-empty str name, got {name!r}")
    with _registry_lock:
        current = _registry.get(name)
        if current is not None and current is not embedder and not replace:
            raise ValueError(f"another embedder is registered as {name!r}: pass "
                             "replace=True to register_embedder() to swap it")
        _registry[name] = embedder


def get_embedder(name: str) -> Embedder:
    """The embedder registered as ``name``; ``tenantdb-hashing-N`` names always resolve.

    :raises LookupError: no embedder of that name in this process (register it at start-up
        with :func:`register_embedder`, or pass ``embedder=`` to the search).
    """
    with _registry_lock:
        found = _registry.get(name)
    if found is not None:
        return found
    hashing = _HASHING_NAME.fullmatch(name)
    if hashing is not None:
        return HashingEmbedder(int(hashing.group(1)))
    raise LookupError(f"no embedder named {name!r} in this process: call "
                      "tenantdb.embedder.register_embedder(...) with it at start-up, or pass "
                      "embedder=... to search_knowledge()")
