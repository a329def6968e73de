"""Stage 3: train the model on the TFRecord shards, resumably, and record the run in MLflow.

Resumption: after every epoch the full training state (weights, optimizer slots, epoch, history,
MLflow run id) is written atomically to the checkpoint folder, which DVC keeps across re-runs
(``persist: true``). A stage killed mid-training picks up at the last completed epoch on the next
``dvc repro``, continues the same MLflow run, and ends with the same weights as an uninterrupted
run: each epoch's shuffle is seeded by (seed, epoch), not by how many epochs this process ran.
The checkpoint is emptied once the final model is saved, so ``dvc repro --force`` retrains.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from charrnn import files, model as model_lib, sequences, tracking
from charrnn.config import TrainConfig
from charrnn.errors import UserError
from charrnn.vocabulary import Vocabulary

CHECKPOINT_FILE = "checkpoint.keras"
STATE_FILE = "state.json"


# ---- distribution ------------------------------------------------------------------------


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        # Keras 3's fit() fails under MultiWorkerMirroredStrategy (keras-team/keras#20585: it
        # all-reduces the input batch and scalar logs along axis 0). Refuse before any work.
        raise UserError(
            "train.strategy 'multi_worker' is not available: Keras 3 fit() does not run under "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585); use 'default' or 'mirrored'"
        )
    return tf.distribute.get_strategy()


# ---- data -------------------------------------------------------------------------------


def training_dataset(shards, seq_length, config: TrainConfig, start_batch: int):
    """An endless stream of training batches, starting at batch ``start_batch`` of the stream.

    The stream is pass after pass over the shards, pass p shuffled with the seed (seed, p); an
    epoch is the next ``steps_per_epoch`` batches of it (a full pass by default). Where a batch
    sits in the stream depends only on its index, so a resumed run sees the same batches as an
    uninterrupted one. ``shards`` is a list of (path, windows).
    """
    batch_size = config.batch_size
    batches_per_pass = sum(n for _, n in shards) // batch_size
    windows = sequences.windows_dataset([p for p, _ in shards], seq_length)

    def one_pass(index):
        return windows.shuffle(
            config.shuffle_buffer, seed=config.seed * 1_000_003 + index, reshuffle_each_iteration=False
        ).batch(batch_size, drop_remainder=True)

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


def validation_dataset(paths, seq_length, batch_size, windows):
    """Every validation window once, in order (the last batch may be smaller)."""
    return (
        sequences.windows_dataset(list(paths), seq_length)
        .apply(tf.data.experimental.assert_cardinality(windows))  # lets Keras show the total
        .batch(batch_size)
        .map(sequences.split_window)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )


# ---- checkpoints and history ---------------------------------------------------------------


def resume_key(config: TrainConfig, manifest: dict) -> str:
    """What a checkpoint must match to be resumed: every train param but ``epochs``, and the data."""
    params = dataclasses.asdict(config)
    params.pop("epochs")
    blob = json.dumps({"train": params, "data": manifest}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_state(checkpoint_dir: Path) -> dict | None:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Empty the folder but keep it: DVC tracks it as a persistent output."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint_dir.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


class EpochCheckpoint(keras.callbacks.Callback):
    """Save model + optimizer, then (atomically) the state that points at it, every epoch.

    Keras' BackupAndRestore writes weights and metadata as two non-atomic files and forgets the
    history; a kill between the two would resume from the wrong epoch.
    """

    def __init__(self, checkpoint_dir: Path, state: dict):
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.state["history"].append(
            {"epoch": epoch + 1, "loss": float(logs["loss"]), "val_loss": float(logs["val_loss"])}
        )
        self.state["epoch"] = epoch + 1
        model_lib.save_keras(self.model, self.checkpoint_dir / CHECKPOINT_FILE)
        files.write_json(self.checkpoint_dir / STATE_FILE, self.state)


class MlflowEpochMetrics(keras.callbacks.Callback):
    """``loss`` and ``val_loss`` at step = epoch number (1-based, absolute across resumes)."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        mlflow.log_metrics({k: float(logs[k]) for k in ("loss", "val_loss") if k in logs}, step=epoch + 1)


def history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch", "loss", "val_loss"], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({"epoch": row["epoch"], "loss": f"{row['loss']:.6f}", "val_loss": f"{row['val_loss']:.6f}"})
    return out.getvalue()


# ---- training --------------------------------------------------------------------------------


def configure_determinism(config: TrainConfig) -> None:
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def check_data(manifest: dict, config: TrainConfig) -> None:
    train_windows = manifest["splits"]["train"]["windows"]
    if train_windows < config.batch_size:
        L = manifest["seq_length"]
        raise UserError(
            f"the training split has {train_windows} sequences of {L} characters, fewer than "
            f"train.batch_size={config.batch_size}: not one full batch; lower batch_size or "
            "seq_length, or use a longer corpus"
        )


def train(
    config: TrainConfig,
    sequences_dir: Path,
    vocabulary_path: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    history_path: Path,
    experiment: str,
    mlflow_params: dict,
) -> dict:
    """Train (or resume), save the model folder and history, and log the run. Returns metrics."""
    manifest = sequences.load_manifest(sequences_dir)
    vocabulary = Vocabulary.load(vocabulary_path)
    if manifest["vocab_size"] != len(vocabulary):
        raise UserError(
            f"{sequences_dir} was built for {manifest['vocab_size']} symbols but {vocabulary_path} "
            f"has {len(vocabulary)}; rerun `dvc repro`"
        )
    check_data(manifest, config)
    experiment_id = tracking.setup(experiment)  # before any training: fail fast
    configure_determinism(config)
    strategy = make_strategy(config.strategy)
    seq_length = manifest["seq_length"]
    train_paths = sequences.shard_paths(sequences_dir, manifest, "train")
    val_paths = sequences.shard_paths(sequences_dir, manifest, "val")
    key = resume_key(config, manifest)

    state = read_state(checkpoint_dir)
    resuming = bool(
        state and state.get("key") == key and (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file()
        and state["epoch"] <= config.epochs
    )
    with strategy.scope():
        if resuming:
            model = model_lib.load_keras(Path(checkpoint_dir) / CHECKPOINT_FILE, compile=True)
            print(f"resuming from epoch {state['epoch']} ({checkpoint_dir})", flush=True)
        else:
            clear_checkpoints(checkpoint_dir)
            state = {"key": key, "epoch": 0, "history": [], "run_id": None}
            model = model_lib.build_model(
                len(vocabulary), config.embedding_dim, config.rnn_units, config.num_layers,
                config.dropout, config.precision,
            )
            model_lib.compile_model(model, config.learning_rate, config.clipnorm)
    initial_epoch = state["epoch"]

    steps = steps_per_epoch(config, manifest)
    train_shards = list(zip(train_paths, [s["windows"] for s in manifest["splits"]["train"]["shards"]]))
    # Under MirroredStrategy Keras splits each global batch of this stream across the replicas.
    train_ds = training_dataset(train_shards, seq_length, config, initial_epoch * steps)
    val_windows = manifest["splits"]["val"]["windows"]
    val_ds = validation_dataset(val_paths, seq_length, config.batch_size, val_windows)
    if config.validation_steps:
        val_ds = val_ds.take(config.validation_steps)  # the same leading val batches every epoch

    run_id = state.get("run_id") if resuming and state.get("run_id") and tracking.run_exists(state["run_id"]) else None
    active_run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id)
    try:
        state["run_id"] = active_run.info.run_id
        if run_id is None:
            mlflow.set_tags({**tracking.source_tags(), tracking.RESUME_KEY_TAG: key})
            mlflow.log_params({**mlflow_params, "data.vocab_size": len(vocabulary),
                               "data.train_windows": manifest["splits"]["train"]["windows"],
                               "model.parameters": model.count_params()})
            mlflow.log_text(model_lib.summary_text(model), "model_summary.txt")
            mlflow.log_dict({"chars": vocabulary.chars}, "vocabulary.json")
        callbacks = [MlflowEpochMetrics(), EpochCheckpoint(checkpoint_dir, state)]
        if initial_epoch < config.epochs:
            try:
                model.fit(
                    train_ds,
                    epochs=config.epochs,
                    initial_epoch=initial_epoch,
                    steps_per_epoch=steps,
                    validation_data=val_ds,
                    callbacks=callbacks,
                    verbose=1,
                )
            except tf.errors.DataLossError as err:
                # The message is "Graph execution error: ... corrupted record at N ..."; keep the cause.
                lines = [line.strip() for line in err.message.splitlines() if line.strip()]
                cause = next((line for line in lines if " record at " in line), lines[0] if lines else "data loss")
                raise UserError(
                    f"a TFRecord shard in {sequences_dir} is corrupt ({cause[:160]}); "
                    "rerun `dvc repro --force sequences`"
                ) from None
        history = state["history"]
        final = {"loss": history[-1]["loss"], "val_loss": history[-1]["val_loss"]}
        final["val_bpc"] = final["val_loss"] / math.log(2)

        model_lib.save_model_dir(model, vocabulary, Path(model_dir))
        files.write_text(history_path, history_csv(history))
        mlflow.set_tag(tracking.MODEL_HASH_TAG, files.sha256_file(Path(model_dir) / model_lib.MODEL_FILE))
        mlflow.log_artifact(str(history_path))
        log_keras_model(model, len(vocabulary))
        clear_checkpoints(checkpoint_dir)
    except BaseException as err:
        mlflow.set_tag("charrnn.error", f"{type(err).__name__}: {err}"[:5000])
        mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()
    return final


def log_keras_model(model: keras.Model, vocab_size: int) -> None:
    """Log with MLflow's Keras flavor; the signature leaves batch and length free (-1, -1)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int32"), (-1, -1), "ids")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, vocab_size), "logits")]),
    )
    mlflow.keras.log_model(
        model,
        name="model",
        signature=signature,
        # Pinning requirements skips MLflow's slow inference (it reloads the model in a subprocess).
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
    )
