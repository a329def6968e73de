"""vectorize: the corpus as ids, split into train (head) and val (tail)."""

from __future__ import annotations


import numpy as np

from charrnn.artifacts import load_ids
from charrnn.vectorize import vectorize
from conftest import defaults


def test_vectorize_splits_head_and_tail_without_overlap(tmp_path, corpus_text, monkeypatch):
    monkeypatch.setattr("charrnn.vectorize.CHUNK_CHARS", 4096)  # several chunks, one straddling the split
    source = tmp_path / "corpus.txt"
    source.write_text(corpus_text, encoding="utf-8")
    result = vectorize(defaults("data", source=str(source), val_fraction=0.1), tmp_path / "out", tmp_path / "cache")
    vocabulary, train, val = load_ids(tmp_path / "out")
    ids = vocabulary.encode(corpus_text)
    assert len(train) == result.train_chars and len(val) == result.val_chars
    assert len(train) + len(val) == len(corpus_text)
    assert len(val) == round(0.1 * len(corpus_text))
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)  # head/tail, disjoint, complete
    assert vocabulary.chars == sorted(set(corpus_text))
