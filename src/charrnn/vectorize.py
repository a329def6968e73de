"""Stage 1: corpus -> vocabulary + ids, split into train (head) and validation (tail).

The corpus is streamed twice in fixed-size chunks, so memory stays bounded whatever its size:
the first pass finds the vocabulary and the length, the second writes ids straight into
memory-mapped ``.npy`` files. Validation is the last ``val_fraction`` of the text and never
overlaps training.
"""

from __future__ import annotations

import collections
import hashlib
import io
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn import corpus, files
from charrnn.config import DataConfig
from charrnn.errors import UserError
from charrnn.artifacts import CORPUS_FILE, TRAIN_IDS, VAL_IDS, VOCABULARY_FILE
from charrnn.vocabulary import Vocabulary

CHUNK_CHARS = 1 << 22  # 4 Mi characters per read: bounded memory, few Python round trips
TEXT_CONTROLS = set("\t\n\v\f\r")
MAX_CONTROL_SHARE = 0.01


@dataclass(frozen=True)
class VectorizeResult:
    vocabulary: Vocabulary
    train_chars: int
    val_chars: int


def _chunks(path: Path | None, text: str | None, description: str):
    stream = io.StringIO(text) if path is None else open(path, encoding="utf-8", newline="")
    offset = 0
    with stream:
        while True:
            try:
                chunk = stream.read(CHUNK_CHARS)
            except UnicodeDecodeError as err:
                raise UserError(
                    f"corpus {description} is not UTF-8 text (bad byte near character "
                    f"{offset + err.start}); convert it with `iconv -t UTF-8`"
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            yield chunk


def _codepoints(chunk: str) -> np.ndarray:
    return np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)


def scan(path, text, description) -> tuple[collections.Counter, int]:
    """First pass: character counts and length (numpy does the counting, not Python)."""
    counts: collections.Counter = collections.Counter()
    for chunk in _chunks(path, text, description):
        values, n = np.unique(_codepoints(chunk), return_counts=True)
        counts.update({chr(v): int(c) for v, c in zip(values, n)})
    return counts, sum(counts.values())


def check_is_text(counts: collections.Counter, total: int, description: str) -> None:
    """Refuse UTF-8 that is not text: NULs (UTF-16/32 read as UTF-8, every other byte 0) or a
    corpus made of control characters (binary data that happens to decode)."""
    nul = counts.get("\0", 0)
    if nul:
        raise UserError(
            f"corpus {description} is not text: {nul:,} of {total:,} characters are NUL (U+0000), as in "
            "UTF-16/UTF-32 text or binary data; convert it with `iconv -f UTF-16LE -t UTF-8` (or the "
            "encoding it has)"
        )
    controls = sum(n for c, n in counts.items() if c not in TEXT_CONTROLS and unicodedata.category(c) == "Cc")
    if controls > MAX_CONTROL_SHARE * total:
        raise UserError(
            f"corpus {description} is not text: {controls / total:.0%} of its characters are control "
            "characters (binary data?); point data.source at a plain-text file"
        )


def vectorize(config: DataConfig, out_dir: Path, cache_dir: Path) -> VectorizeResult:
    """Build ``vocabulary.json``, ``train.npy`` and ``val.npy`` (uint16 ids) in ``out_dir``."""
    description, path, text = corpus.open_corpus(config.source, config.sha256, cache_dir)
    counts, total = scan(path, text, description)
    if total == 0:
        raise UserError(f"corpus {description} is empty; point data.source at a text file")
    if not "".join(counts).strip():
        raise UserError(f"corpus {description} holds only whitespace; point data.source at real text")
    if len(counts) < 2:
        raise UserError(
            f"corpus {description} has a single distinct character ({next(iter(counts))!r}); "
            "a language model needs at least two"
        )
    check_is_text(counts, total, description)
    vocabulary = Vocabulary.from_counts(counts)
    if len(vocabulary) > np.iinfo(np.uint16).max:
        raise UserError(f"corpus {description} has {len(vocabulary)} distinct characters (max 65535)")
    val_chars = int(round(total * config.val_fraction))
    train_chars = total - val_chars
    if val_chars < 2 or train_chars < 2:
        raise UserError(
            f"corpus {description} has {total} characters: too short to split with "
            f"data.val_fraction={config.val_fraction}; use a longer corpus"
        )

    # The vocabulary is sorted by code point, so a binary search maps code points to ids.
    sorted_codepoints = np.array([ord(c) for c in vocabulary.chars], dtype=np.uint32)
    with files.atomic_dir(out_dir) as tmp:
        vocabulary.save(tmp / VOCABULARY_FILE)
        sha256 = files.sha256_file(path) if path is not None else hashlib.sha256(text.encode("utf-8")).hexdigest()
        files.write_json(tmp / CORPUS_FILE, {
            "source": config.source, "description": description, "sha256": sha256,
            "characters": total, "vocab_size": len(vocabulary),
        })
        train = np.lib.format.open_memmap(tmp / TRAIN_IDS, mode="w+", dtype=np.uint16, shape=(train_chars,))
        val = np.lib.format.open_memmap(tmp / VAL_IDS, mode="w+", dtype=np.uint16, shape=(val_chars,))
        position = 0
        for chunk in _chunks(path, text, description):
            ids = np.searchsorted(sorted_codepoints, _codepoints(chunk)).astype(np.uint16)
            end = position + len(ids)
            if position < train_chars:
                n = min(end, train_chars) - position
                train[position:position + n] = ids[:n]
            if end > train_chars:
                start = max(position, train_chars)
                val[start - train_chars:end - train_chars] = ids[start - position:]
            position = end
        train.flush()
        val.flush()
        del train, val
    return VectorizeResult(vocabulary, train_chars, val_chars)
