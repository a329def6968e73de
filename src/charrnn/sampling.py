"""Sampling options, checked before TensorFlow loads (so a bad flag fails in a fraction of a second)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from charrnn.errors import UserError


@dataclass(frozen=True)
class SamplingOptions:
    length: int = 1000
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means the whole vocabulary
    num_samples: int = 1
    seed: int = 0

    def check(self, vocab_size: int | None = None) -> None:
        """Refuse out-of-range options (top-k is bounded by the vocabulary once it is known)."""
        if not isinstance(self.length, int) or self.length < 1:
            raise UserError(f"length must be a positive integer, got {self.length!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0 or (vocab_size and self.top_k > vocab_size):
            limit = f"the vocabulary size {vocab_size}" if vocab_size else "the vocabulary size"
            raise UserError(f"top-k must be between 0 (off) and {limit}, got {self.top_k!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise UserError(f"num-samples must be a positive integer, got {self.num_samples!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {self.seed!r}")
