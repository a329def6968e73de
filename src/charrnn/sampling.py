"""Sampling options: defined and validated once, for params.yaml's ``sample`` section, ``charrnn
generate`` and the served model.

``SamplingOptions()`` and ``DEFAULT_PRIME`` are the defaults wherever there is no params.yaml to
read them from (the served model, ``charrnn generate`` outside a project); in a project they are
params.yaml's ``sample`` section. Checked before TensorFlow loads, so a bad option fails in a
fraction of a second.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from charrnn.config import SAMPLING_RULES, SampleConfig
from charrnn.errors import UserError

DEFAULT_PRIME = "ROMEO: "  # the tutorial's; where a corpus lacks its characters, train primes with its own text

@dataclass(frozen=True)
class SamplingOptions:
    length: int = 1000  # characters after the prime
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means the whole vocabulary
    num_samples: int = 1  # streams generated at once
    seed: int = 0  # same seed, same text

    @classmethod
    def of(cls, sample: SampleConfig) -> SamplingOptions:
        """params.yaml's ``sample`` section as options (all but the prime)."""
        return cls(sample.length, sample.temperature, sample.top_k, sample.num_samples, sample.seed)

    def check(self, vocab_size: int | None = None) -> None:
        """Refuse out-of-range options (top-k is bounded by the vocabulary once it is known), naming
        each as its ``charrnn generate`` flag."""
        for name, (check, must) in SAMPLING_RULES.items():
            value = getattr(self, name)
            if not _is_a(value, typing.get_type_hints(SamplingOptions)[name]) or not check(value):
                raise UserError(f"{name.replace('_', '-')} {must}, got {value!r}")
        if vocab_size and self.top_k > vocab_size:
            raise UserError(f"top-k must be between 0 (off) and the vocabulary size {vocab_size}, got {self.top_k!r}")


def _is_a(value, kind: type) -> bool:
    """An int for an int option; an int or a float for a float one (never a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
