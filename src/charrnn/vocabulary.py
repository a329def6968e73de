"""The character vocabulary: a stable, sorted list of symbols stored as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charrnn import files
from charrnn.errors import UserError

VOCABULARY_FILE = "vocabulary.json"


class Vocabulary:
    """Maps characters to ids (their index in sorted order) and back."""

    def __init__(self, chars):
        chars = list(chars)
        if len(set(chars)) != len(chars) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise UserError("vocabulary must be a list of distinct single characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_counts(cls, counts) -> "Vocabulary":
        return cls(sorted(counts))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.chars == other.chars

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` outside the vocabulary, sorted."""
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str) -> np.ndarray:
        missing = self.unknown(text)
        if missing:
            raise UserError(
                "characters not in the vocabulary: "
                + " ".join(repr(c) for c in missing)
                + "; remove them from the text"
            )
        return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def save(self, path: str | Path) -> None:
        files.write_json(path, {"chars": self.chars})

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"vocabulary not found: {path}; run `dvc repro` to build it")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            chars = data["chars"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a vocabulary file; rebuild it with `dvc repro`") from None
        return cls(chars)
