"""Stage 2: ids -> (input, target) windows in sharded TFRecord files, and reading them back.

Window k covers ids[k*L : k*L + L + 1] (L = seq_length): input is its first L ids, target its
last L, and consecutive windows share one id so every transition in the text is trained on once.
Shards are cut at a target size so that workers can split the data by file, and a JSON manifest
records the count and byte size of each shard so a truncated or swapped shard is caught before
training starts, not hours in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from charrnn import files
from charrnn.errors import UserError
from charrnn.artifacts import MANIFEST_FILE, load_ids

FORMAT = "tf.train.Example{ids: int64[seq_length + 1]}"


# ---- writing ---------------------------------------------------------------------------------


def _example(window: np.ndarray) -> bytes:
    feature = tf.train.Feature(int64_list=tf.train.Int64List(value=window.tolist()))
    return tf.train.Example(features=tf.train.Features(feature={"ids": feature})).SerializeToString()


def window_count(n_ids: int, seq_length: int) -> int:
    return max(0, (n_ids - 1) // seq_length)


def write_shards(ids: np.ndarray, seq_length: int, out_dir: Path, split: str, shard_bytes: int) -> dict:
    """Write the windows of ``ids`` into ``{split}-NNNNN.tfrecord`` files of about ``shard_bytes``."""
    shards, writer, written, count = [], None, 0, 0
    n = window_count(len(ids), seq_length)
    for k in range(n):
        if writer is None:
            name = f"{split}-{len(shards):05d}.tfrecord"
            writer = tf.io.TFRecordWriter(str(out_dir / name))
            written, count = 0, 0
        record = _example(np.asarray(ids[k * seq_length:k * seq_length + seq_length + 1], dtype=np.int64))
        writer.write(record)
        written += len(record) + 16  # TFRecord framing: length, two CRCs
        count += 1
        if written >= shard_bytes or k == n - 1:
            writer.close()
            writer = None
            shards.append({"file": name, "windows": count, "bytes": (out_dir / name).stat().st_size})
    return {"windows": n, "shards": shards}


def build_sequences(vectorized_dir: Path, out_dir: Path, seq_length: int, shard_size_mb: float) -> dict:
    """Write train/val TFRecord shards and ``manifest.json`` into ``out_dir`` (atomically)."""
    vocabulary, train_ids, val_ids = load_ids(vectorized_dir)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if window_count(len(ids), seq_length) == 0:
            raise UserError(
                f"the {split} split has {len(ids)} characters: too short for one sequence of "
                f"sequences.seq_length={seq_length} (+1); lower seq_length or use a longer corpus"
            )
    shard_bytes = int(shard_size_mb * 1024 * 1024)
    with files.atomic_dir(out_dir) as tmp:
        manifest = {
            "format": FORMAT,
            "seq_length": seq_length,
            "vocab_size": len(vocabulary),
            "splits": {
                "train": write_shards(train_ids, seq_length, tmp, "train", shard_bytes),
                "val": write_shards(val_ids, seq_length, tmp, "val", shard_bytes),
            },
        }
        files.write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


# ---- reading ---------------------------------------------------------------------------------


def parse_windows(records: tf.data.Dataset, seq_length: int) -> tf.data.Dataset:
    """Serialized examples -> int32 windows of seq_length + 1 ids (order kept)."""
    spec = {"ids": tf.io.FixedLenFeature([seq_length + 1], tf.int64)}

    def parse(record):
        return tf.cast(tf.io.parse_single_example(record, spec)["ids"], tf.int32)

    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def windows_dataset(paths, seq_length: int) -> tf.data.Dataset:
    """The windows of the given shards, in file order."""
    return parse_windows(tf.data.TFRecordDataset(list(paths)), seq_length)


def split_window(window):
    return window[..., :-1], window[..., 1:]
