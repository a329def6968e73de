"""The stage contract: the files one stage writes and a later stage reads, and their readers.

A stage imports what it runs (every import is a rerun edge in dvc.yaml, tests/test_dvc_deps.py); what
stages share is here, so `sequences` reads vectorize's ids without depending on the corpus
downloader, and train and evaluate read the manifest without the shard writer.

    vectorize -> VOCABULARY_FILE, TRAIN_IDS, VAL_IDS (uint16 ids), CORPUS_FILE (what the corpus was)
    sequences -> MANIFEST_FILE naming the TFRecord shards of each split (SPLITS)
    train     -> a model folder: MODEL_FILE (Keras), its VOCABULARY_FILE, SUMMARY_FILE

The readers check what they can without TensorFlow, so a stage refuses bad input in a second.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from charrnn.errors import UserError
from charrnn.vocabulary import VOCABULARY_FILE, Vocabulary

TRAIN_IDS = "train.npy"
VAL_IDS = "val.npy"
CORPUS_FILE = "corpus.json"  # what the corpus was: source, SHA-256, size (MLflow's dataset input)
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
MODEL_FILE = "model.keras"
SUMMARY_FILE = "model_summary.txt"

__all__ = ["VOCABULARY_FILE", "TRAIN_IDS", "VAL_IDS", "CORPUS_FILE", "MANIFEST_FILE", "SPLITS", "MODEL_FILE",
           "SUMMARY_FILE", "load_ids", "load_manifest", "shard_paths", "training_inputs", "check_model_dir",
           "check_output_size"]


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


def training_inputs(sequences_dir: Path, vocabulary_path: Path, batch_size: int) -> tuple[dict, Vocabulary]:
    """The shards' manifest and the vocabulary, checked to fit each other and one batch of ``batch_size``."""
    manifest = load_manifest(sequences_dir)
    vocabulary = Vocabulary.load(vocabulary_path)
    if manifest["vocab_size"] != len(vocabulary):
        raise UserError(
            f"{sequences_dir} was built for {manifest['vocab_size']} symbols but {vocabulary_path} "
            f"has {len(vocabulary)}; rerun `dvc repro`"
        )
    train_windows = manifest["splits"]["train"]["windows"]
    if train_windows < batch_size:
        raise UserError(
            f"the training split has {train_windows} sequences of {manifest['seq_length']} characters, fewer "
            f"than train.batch_size={batch_size}: not one full batch; lower batch_size or seq_length, or use a "
            "longer corpus"
        )
    return manifest, vocabulary


def check_model_dir(model_dir: Path) -> Vocabulary:
    """The vocabulary of a trained model folder, once the folder is checked as far as it can be
    without loading the model: ``model.keras`` is there, a zip, and (where its ``config.json`` says)
    its ``logits`` layer predicts as many symbols as the vocabulary has."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir}; train one with `dvc repro` or pass --model")
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} is not a model folder (no {MODEL_FILE}); pass the folder written by the train stage")
    if not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise UserError(f"{path} is not a Keras model: not a zip archive (damaged or replaced); retrain it with `dvc repro`")
    vocabulary = Vocabulary.load(model_dir / VOCABULARY_FILE)
    output_size = _logits_units(path)
    if output_size is not None:
        check_output_size(model_dir, output_size, vocabulary)
    return vocabulary


def check_output_size(model_dir: Path, output_size: int, vocabulary: Vocabulary) -> None:
    """The model predicts one logit per symbol of the vocabulary saved beside it."""
    if output_size != len(vocabulary):
        raise UserError(
            f"{model_dir}: vocabulary has {len(vocabulary)} characters but the model predicts "
            f"{output_size}; use the vocabulary.json saved with this model"
        )


def _logits_units(path: Path) -> int | None:
    """The ``logits`` layer's units in a ``.keras`` archive's ``config.json``; None where it cannot be
    read (the model load then names what is wrong)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        layers = config["config"]["layers"]
        return next(int(layer["config"]["units"]) for layer in layers if layer["config"].get("name") == "logits")
    except (OSError, KeyError, TypeError, ValueError, StopIteration, zipfile.BadZipFile):
        return None
