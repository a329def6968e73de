"""The character vocabulary."""

from __future__ import annotations


import pytest

from charrnn.errors import UserError
from charrnn.vocabulary import Vocabulary


def test_vocabulary_round_trip(tmp_path):
    text = "First Citizen:\nBefore we proceed, hear me speak. é—ü"
    vocabulary = Vocabulary.from_counts(set(text))
    vocabulary.save(tmp_path / "vocabulary.json")
    loaded = Vocabulary.load(tmp_path / "vocabulary.json")
    assert loaded == vocabulary
    assert loaded.chars == sorted(set(text))
    assert loaded.decode(loaded.encode(text)) == text


def test_vocabulary_refuses_unknown_characters():
    with pytest.raises(UserError, match="'z'"):
        Vocabulary(list("abc")).encode("abz")
