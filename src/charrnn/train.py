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
import os
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
        if not os.environ.get("TF_CONFIG"):
            raise UserError("train.strategy is 'multi_worker' but TF_CONFIG is not set; see README 'Team setup'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Worker 0 (or the task named "chief") writes checkpoints, the model and the MLflow run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


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
    """What a checkpoint must match to be resumed: every train param but ``epochs`` (unless the
    learning rate decays over them) and ``strategy``, and the data. The strategy only says where
    the same global batch is computed, so a run started on two workers can finish on one machine.
    """
    params = dataclasses.asdict(config)
    if config.lr_decay_fraction == 0:  # a decaying learning rate is laid out over all the epochs
        params.pop("epochs")
    params.pop("strategy")
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
) -> dict | None:
    """Train (or resume), save the model folder and history, and log the run.

    Returns the final metrics, or None on a multi-worker worker that is not the chief.
    """
    manifest = sequences.load_manifest(sequences_dir)
    vocabulary = Vocabulary.load(vocabulary_path)
    if manifest["vocab_size"] != len(vocabulary):
        raise UserError(
            f"{sequences_dir} was built for {manifest['vocab_size']} symbols but {vocabulary_path} "
            f"has {len(vocabulary)}; rerun `dvc repro`"
        )
    check_data(manifest, config)
    steps = steps_per_epoch(config, manifest)
    strategy = make_strategy(config.strategy)  # first: collective ops must be set up before others
    chief = is_chief(strategy)
    experiment_id = tracking.setup(experiment) if chief else None  # before any training: fail fast
    configure_determinism(config)
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
            if chief:
                clear_checkpoints(checkpoint_dir)
            state = {"key": key, "epoch": 0, "history": [], "run_id": None}
            model = model_lib.build_model(
                len(vocabulary), config.embedding_dim, config.rnn_units, config.num_layers,
                config.dropout, config.precision,
            )
            schedule = model_lib.learning_rate_schedule(config.learning_rate, config.epochs * steps,
                                                        config.lr_decay_fraction)
            model_lib.compile_model(model, schedule, config.clipnorm)
        if config.jit_compile and config.strategy != "multi_worker":
            # Recompiling keeps the optimizer (and its restored state); only the train step changes.
            model.compile(optimizer=model.optimizer, loss=model.loss, jit_compile=True)
    initial_epoch = state["epoch"]

    train_shards = list(zip(train_paths, [s["windows"] for s in manifest["splits"]["train"]["shards"]]))
    val_windows = manifest["splits"]["val"]["windows"]
    val_ds = validation_dataset(val_paths, seq_length, config.batch_size, val_windows)
    if config.validation_steps:
        val_ds = val_ds.take(config.validation_steps)  # the same leading val batches every epoch

    if not chief:  # a worker that writes nothing: train in step with the others, then leave
        fit_multi_worker(model, strategy, config, train_shards, seq_length, val_ds, steps, initial_epoch, [], 0)
        return None

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
                if config.strategy == "multi_worker":
                    fit_multi_worker(model, strategy, config, train_shards, seq_length, val_ds, steps,
                                     initial_epoch, callbacks, 1)
                else:
                    # Under MirroredStrategy Keras splits each global batch across the replicas.
                    model.fit(
                        training_dataset(train_shards, seq_length, config, initial_epoch * steps),
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


def fit_multi_worker(model, strategy, config, train_shards, seq_length, val_ds, steps, initial_epoch,
                     callbacks, verbose):
    """The training loop under MultiWorkerMirroredStrategy, where Keras 3's ``fit()`` fails
    (keras-team/keras#20585). Each worker streams its own subset of the shard files and batches
    its share of the global batch; the optimizer all-reduces the gradients; every worker scores
    the same validation batches. Callbacks get the same ``on_epoch_end`` logs as under ``fit``.
    """

    def dataset_fn(context):
        shards = train_shards[context.input_pipeline_id::context.num_input_pipelines]
        if not shards:
            raise UserError(f"{context.num_input_pipelines} workers but only {len(train_shards)} train "
                            "shard(s); lower sequences.shard_size_mb so every worker gets a shard")
        local = dataclasses.replace(config, batch_size=context.get_per_replica_batch_size(config.batch_size))
        return training_dataset(shards, seq_length, local, initial_epoch * steps)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    @tf.function
    def train_step(iterator):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                per_sequence = tf.reduce_mean(per_token(y, model(x, training=True)), axis=1)
                loss = tf.reduce_sum(per_sequence) / config.batch_size  # this replica's share of the mean
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)), axis=None)

    @tf.function
    def val_step(x, y):
        return tf.reduce_mean(per_token(y, model(x, training=False)))

    for callback in callbacks:
        callback.set_model(model)
    for epoch in range(initial_epoch, config.epochs):
        if verbose:
            print(f"Epoch {epoch + 1}/{config.epochs}", flush=True)
        bar = keras.utils.Progbar(steps, verbose=verbose)
        losses = []
        for i in range(steps):
            losses.append(float(train_step(iterator)))
            bar.update(i + 1, [("loss", losses[-1])])
        scored = [(float(val_step(x, y)), int(x.shape[0])) for x, y in val_ds]
        logs = {"loss": float(np.mean(losses)),
                "val_loss": sum(l * n for l, n in scored) / sum(n for _, n in scored)}
        if verbose:
            print(f"loss {logs['loss']:.4f} - val_loss {logs['val_loss']:.4f}", flush=True)
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)


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
