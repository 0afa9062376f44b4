"""Embedders: text to vectors. The default needs no network and no model download.

:class:`HashingEmbedder` hashes words and word pairs into a fixed number of signed buckets
and L2-normalises the result: deterministic across processes and machines, and texts that
share words land near each other, which is all seeds and tests need. Anything with an
``embed`` method and a ``dimensions`` attribute plugs in (:class:`Embedder`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Embedder", "HashingEmbedder", "default_embedder"]

_WORD = re.compile(r"[a-z0-9]+")


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
        if dimensions <= 0:
            raise ValueError(f"dimensions must be positive, got {dimensions}")
        self._dimensions = dimensions

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
