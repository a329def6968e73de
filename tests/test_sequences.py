"""sequences: TFRecord windows written and read back through the stage contract."""

from __future__ import annotations


import numpy as np

from charrnn import artifacts, sequences
from charrnn.artifacts import load_ids
from charrnn.vectorize import vectorize
from conftest import defaults


def test_tfrecord_round_trip(tmp_path, corpus_text):
    source = tmp_path / "corpus.txt"
    source.write_text(corpus_text, encoding="utf-8")
    vectorize(defaults("data", source=str(source)), tmp_path / "vec", tmp_path / "cache")
    seq_length = 50
    manifest = sequences.build_sequences(tmp_path / "vec", tmp_path / "seq", seq_length, shard_size_mb=0.02)
    _, train, val = load_ids(tmp_path / "vec")
    loaded = artifacts.load_manifest(tmp_path / "seq")
    assert loaded == manifest and loaded["seq_length"] == seq_length
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the size target cut several shards
    for split, ids in (("train", train), ("val", val)):
        paths = artifacts.shard_paths(tmp_path / "seq", manifest, split)
        read = np.stack([w.numpy() for w in sequences.windows_dataset(paths, seq_length)])
        n = (len(ids) - 1) // seq_length
        expected = np.stack([ids[k * seq_length:k * seq_length + seq_length + 1] for k in range(n)])
        assert read.shape == (n, seq_length + 1)
        np.testing.assert_array_equal(read, expected)
        x, y = sequences.split_window(read)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # target = input shifted by one
