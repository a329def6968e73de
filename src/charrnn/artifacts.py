"""The stage contract: the files one stage writes and a later stage reads, and their readers.

A stage imports what it runs (every import is a rerun edge in dvc.yaml, tests/test_dvc_deps.py); what
stages share is here, so `sequences` reads vectorize's ids without depending on the corpus
downloader, and train and evaluate read the manifest without the shard writer.

    vectorize -> VOCABULARY_FILE, TRAIN_IDS, VAL_IDS (uint16 ids), CORPUS_FILE (what the corpus was)
    sequences -> MANIFEST_FILE naming the TFRecord shards of each split (SPLITS)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charrnn.errors import UserError
from charrnn.vocabulary import VOCABULARY_FILE, Vocabulary

TRAIN_IDS = "train.npy"
VAL_IDS = "val.npy"
CORPUS_FILE = "corpus.json"  # what the corpus was: source, SHA-256, size (MLflow's dataset input)
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")

__all__ = ["VOCABULARY_FILE", "TRAIN_IDS", "VAL_IDS", "CORPUS_FILE", "MANIFEST_FILE", "SPLITS",
           "load_ids", "load_manifest", "shard_paths"]


def load_ids(vectorized_dir: Path) -> tuple[Vocabulary, np.ndarray, np.ndarray]:
    """Read back the vocabulary and the (memory-mapped) train and val ids."""
    vectorized_dir = Path(vectorized_dir)
    vocabulary = Vocabulary.load(vectorized_dir / VOCABULARY_FILE)
    try:
        train = np.load(vectorized_dir / TRAIN_IDS, mmap_mode="r")
        val = np.load(vectorized_dir / VAL_IDS, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read ids in {vectorized_dir} ({err}); rerun `dvc repro vectorize`") from None
    return vocabulary, train, val


def load_manifest(sequences_dir: Path) -> dict:
    """Read the manifest and check that every shard it names exists with the recorded size."""
    sequences_dir = Path(sequences_dir)
    path = sequences_dir / MANIFEST_FILE
    fix = "rerun `dvc repro --force sequences`"
    if not path.is_file():
        raise UserError(f"manifest not found: {path}; {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        splits = manifest["splits"]
        for split in SPLITS:
            for shard in splits[split]["shards"]:
                shard_path = sequences_dir / shard["file"]
                if not shard_path.is_file():
                    raise UserError(f"shard {shard_path} named in {path} is missing; {fix}")
                size = shard_path.stat().st_size
                if size != shard["bytes"]:
                    raise UserError(
                        f"shard {shard_path} is {size} bytes but the manifest says {shard['bytes']} "
                        f"(truncated or replaced); {fix}"
                    )
            if sum(s["windows"] for s in splits[split]["shards"]) != splits[split]["windows"]:
                raise UserError(f"{path}: shard counts of '{split}' do not add up; {fix}")
        int(manifest["seq_length"]), int(manifest["vocab_size"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a valid manifest; {fix}") from None
    return manifest


def shard_paths(sequences_dir: Path, manifest: dict, split: str) -> list[str]:
    return [str(Path(sequences_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]
