"""Batch streams over the TFRecord shards: the endless, resumable training stream and the val split.

Where a training batch sits in the stream depends only on its index (pass p over the data is
shuffled with the seed (seed, p)), so a run resumed at batch b sees the same batches from there
on as an uninterrupted run.
"""

from __future__ import annotations

import tensorflow as tf

from charrnn import sequences
from charrnn.config import TrainConfig


def training_dataset(pieces, seq_length: int, start_batch: int, *, batch_size: int, shuffle_buffer: int,
                     seed: int, replicas: int = 1) -> tf.data.Dataset:
    """An endless stream of training batches of ``batch_size``, starting at batch ``start_batch`` of
    the stream (``train.batch_size``, ``train.shuffle_buffer`` and ``train.seed`` on one device).

    The stream is pass after pass over the windows, pass p shuffled in a buffer of ``shuffle_buffer``
    windows with the seed (seed, p); an epoch is the next ``steps_per_epoch`` steps of it (a full
    pass by default). ``pieces`` is a list of (path, windows) (whole shards) or (path, skip, take)
    (a range of a shard's windows).

    ``replicas``: the batches one step takes (a strategy's replicas fed by this stream, each its
    batch in turn). A pass holds whole steps only, as many as one batch of ``replicas`` x
    ``batch_size`` would give, so the ``replicas`` batches of a step are the consecutive slices of
    the batch that stream would yield; ``start_batch`` counts single batches (``replicas`` a step).
    """
    whole_files = all(len(p) == 2 for p in pieces)
    pieces = [(p[0], 0, p[1]) if len(p) == 2 else tuple(p) for p in pieces]
    # Whole steps per pass: per-replica batching alone would drop fewer windows and let a step
    # straddle two passes.
    batches_per_pass = sum(take for _, _, take in pieces) // (batch_size * replicas) * replicas
    if whole_files:  # one reader
        windows = sequences.windows_dataset([p for p, _, _ in pieces], seq_length)
    else:
        parts = [tf.data.TFRecordDataset([p]).skip(skip).take(take) for p, skip, take in pieces]
        records = parts[0]
        for part in parts[1:]:
            records = records.concatenate(part)
        windows = sequences.parse_windows(records, seq_length)

    def one_pass(index):
        return windows.shuffle(
            shuffle_buffer, seed=seed * 1_000_003 + index, reshuffle_each_iteration=False
        ).batch(batch_size, drop_remainder=True).take(batches_per_pass)

    first_pass, offset = divmod(start_batch, batches_per_pass)
    return (
        tf.data.Dataset.range(first_pass, 1 << 62)
        .flat_map(one_pass)
        .skip(offset)
        .map(sequences.split_window, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def steps_per_epoch(config: TrainConfig, manifest: dict) -> int:
    return config.steps_per_epoch or manifest["splits"]["train"]["windows"] // config.batch_size


def validation_dataset(paths, seq_length: int, batch_size: int, windows: int) -> tf.data.Dataset:
    """Every validation window once, in order (the last batch may be smaller)."""
    return (
        sequences.windows_dataset(list(paths), seq_length)
        .apply(tf.data.experimental.assert_cardinality(windows))  # lets Keras show the total
        .batch(batch_size)
        .map(sequences.split_window)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )
