"""Stage 3: train the model on the TFRecord shards, resumably, and record the run in MLflow.

Resumption: after every epoch the training state is committed to the checkpoint folder
(``charrnn.checkpoints``), which DVC keeps across re-runs (``persist: true``). A stage killed at any
instant picks up at the last committed epoch on the next ``dvc repro``, continues the same MLflow
run (``charrnn.training_run``), and ends with the same bytes as an uninterrupted run: where a batch
sits in the stream depends only on its index (``charrnn.batches``), not on how many epochs this
process ran. The checkpoint is emptied once the final model is saved, so ``dvc repro --force``
retrains.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

import keras
import tensorflow as tf

from charrnn import artifacts, autotune, files, lstm_cpu, model as model_lib, optimizer, sequences, tracking, training_run
from charrnn.batches import steps_per_epoch, training_dataset, validation_dataset
from charrnn.checkpoints import Checkpoints, EpochCheckpoint, resume_key
from charrnn.config import TrainConfig
from charrnn.distribute import fit_distributed, is_chief, make_strategy
from charrnn.errors import UserError, first_line
from charrnn.faults import crash_point, step_callbacks
from charrnn.sampling import DEFAULT_PRIME
from charrnn.tracking_callbacks import EpochSamples, TrainingCurves
from charrnn.vocabulary import Vocabulary

HISTORY_FIELDS = ("epoch", "chars", "loss", "val_loss")


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    """What training reads (``sequences``' shards, ``vocabulary``) and writes: the ``model`` folder,
    the resumable ``checkpoints``, the per-epoch ``history``, the per-step ``steps`` (optional) and
    ``run_info`` (what trained)."""

    sequences: Path
    vocabulary: Path
    model: Path
    checkpoints: Path
    history: Path
    run_info: Path
    steps: Path | None = None


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The batch streams' inputs: the training shards as (path, windows), the val split."""

    train_shards: list
    val_paths: list
    val_ds: tf.data.Dataset
    seq_length: int
    steps: int  # per epoch


def steps_csv(steps: list[list[float]]) -> str:
    """The training loss every ``log_every_steps`` steps, as DVC plots it: ``chars`` (x), ``loss``,
    ``learning_rate`` (the same points as MLflow's ``loss`` curve)."""
    rows = {int(chars): (loss, rate) for chars, loss, rate in steps}  # a resumed epoch logs its steps again
    return "chars,loss,learning_rate\n" + "".join(f"{chars},{loss:.6f},{rate:.6g}\n"
                                                   for chars, (loss, rate) in sorted(rows.items()))


def history_csv(history: list[dict]) -> str:
    """The per-epoch history as DVC plots it: ``chars`` (x), ``loss`` and ``val_loss``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({"epoch": row["epoch"], "chars": row["chars"],
                         "loss": f"{row['loss']:.6f}", "val_loss": f"{row['val_loss']:.6f}"})
    return out.getvalue()


def configure_determinism(config: TrainConfig) -> None:
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def sample_prime(vocabulary: Vocabulary, val_paths: list[str], seq_length: int) -> str:
    """The per-epoch samples' prime: the tutorial's ``ROMEO: `` where the corpus has those
    characters, else the start of the validation text."""
    if not vocabulary.unknown(DEFAULT_PRIME):
        return DEFAULT_PRIME
    first = next(iter(sequences.windows_dataset(val_paths[:1], seq_length)))
    return vocabulary.decode(first.numpy()[:16])


# ---- the steps -------------------------------------------------------------------------------


def resolve_auto(config: TrainConfig, vocab_size: int,
                 seq_length: int) -> tuple[TrainConfig, autotune.Resolved]:
    """``config`` with its precision and LSTM path resolved (``auto`` measured or read from the
    cache), and the random state seeded for it."""
    kernels = lstm_cpu.available_kernels(config.cell, config.rnn_units, config.precision == "mixed_bfloat16",
                                         jit_fit(config))
    resolved = autotune.resolve(config, vocab_size, seq_length, kernels)
    config = dataclasses.replace(config, precision=resolved.policy, lstm_kernel=resolved.kernel)
    configure_determinism(config)
    return config, resolved


def new_model(config: TrainConfig, vocab_size: int, steps: int) -> keras.Model:
    """The untrained model, on the fast CPU LSTM, compiled with the run's optimizer and schedule."""
    model = model_lib.model_from_config(vocab_size, config)
    install_lstm(model, config)  # before compile
    optimizer.compile_for_training(model, config, config.epochs * steps)
    return model


def install_lstm(model: keras.Model, config: TrainConfig) -> None:
    """The fast CPU LSTM (not on a GPU) on the run's path, with its weight drop."""
    lstm_cpu.install_model(model, kernel=config.lstm_kernel, weight_drop=config.weight_drop)


def resume_or_start(strategy, checkpoints: Checkpoints, key: str, config: TrainConfig, vocab_size: int,
                    steps: int, chief: bool) -> tuple[dict, keras.Model, bool, str | None]:
    """The checkpoint's state and model where these params can resume it, else a new state and
    model (the chief first ends the run of an interrupted training it abandons, and clears its
    checkpoint). Returns (state, model, resumed, the abandoned run's id or None)."""
    abandoned = None
    with strategy.scope():
        loaded = checkpoints.load(key, config.epochs)
        if loaded:
            state, model = loaded
            install_lstm(model, config)  # as the uninterrupted run: the same bytes
            print(f"resuming from epoch {state['epoch']} ({checkpoints.folder})", flush=True)
        else:
            if chief:
                abandoned = checkpoints.interrupted_run_id()
                if abandoned:
                    tracking.end_abandoned_run(abandoned)
                checkpoints.clear()
            state = {"key": key, "epoch": 0, "history": [], "run_id": None}
            model = new_model(config, vocab_size, steps)
        if jit_fit(config):
            # Recompiling keeps the optimizer (and its restored state); only the train step changes.
            model.compile(optimizer=model.optimizer, loss=model.loss, jit_compile=True)
    return state, model, bool(loaded), abandoned


def jit_fit(config: TrainConfig) -> bool:
    """Whether Keras' ``fit`` runs the train step through XLA (the distributed loop is not ``fit``)."""
    return bool(config.jit_compile and config.strategy == "default")


def datasets(paths: TrainPaths, manifest: dict, config: TrainConfig) -> TrainData:
    """The training shards and the validation batches scored after each epoch."""
    seq_length = manifest["seq_length"]
    train_shards = list(zip(artifacts.shard_paths(paths.sequences, manifest, "train"),
                            [s["windows"] for s in manifest["splits"]["train"]["shards"]]))
    val_paths = artifacts.shard_paths(paths.sequences, manifest, "val")
    val_ds = validation_dataset(val_paths, seq_length, config.batch_size, manifest["splits"]["val"]["windows"])
    if config.validation_steps:
        val_ds = val_ds.take(config.validation_steps)  # the same leading val batches every epoch
    return TrainData(train_shards, val_paths, val_ds, seq_length, steps_per_epoch(config, manifest))


def make_callbacks(config: TrainConfig, data: TrainData, vocabulary: Vocabulary, checkpoints: Checkpoints,
                   state: dict, new_run: bool) -> list:
    """MLflow's curves, the per-epoch samples and the per-epoch checkpoint commit."""
    chars_per_step = config.batch_size * data.seq_length
    callbacks = [
        TrainingCurves(config.log_every_steps, chars_per_step, training_run.logged_curves(state["run_id"], new_run),
                       log_model_info=new_run, steps=state.setdefault("steps", [])),
        EpochSamples(vocabulary, sample_prime(vocabulary, data.val_paths, data.seq_length)),
        EpochCheckpoint(checkpoints, state, chars_per_step),
    ]
    if config.ema_momentum:  # val_loss of the moving average: the weights the model is saved with
        callbacks.append(keras.callbacks.SwapEMAWeights())
    return callbacks + step_callbacks()


def fit(model: keras.Model, strategy, config: TrainConfig, data: TrainData, initial_epoch: int, callbacks: list,
        sequences_dir: Path) -> None:
    """Train from ``initial_epoch`` to ``config.epochs``; a corrupt shard is one line naming the fix."""
    if initial_epoch >= config.epochs:
        return
    try:
        if config.strategy != "default":  # the replicas' gradients summed before the clip
            fit_distributed(model, strategy, config, data.train_shards, data.seq_length, data.val_ds, data.steps,
                            initial_epoch, callbacks, 1)
        else:
            model.fit(
                training_dataset(data.train_shards, data.seq_length, initial_epoch * data.steps,
                                 batch_size=config.batch_size, shuffle_buffer=config.shuffle_buffer,
                                 seed=config.seed),
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=data.steps,
                validation_data=data.val_ds,
                callbacks=callbacks,
                verbose=1,
            )
    except tf.errors.DataLossError as err:
        # The message is "Graph execution error: ... corrupted record at N ..."; keep the cause.
        lines = [line.strip() for line in err.message.splitlines()]
        cause = next((line for line in lines if " record at " in line), first_line(err.message, "data loss"))
        raise UserError(
            f"a TFRecord shard in {sequences_dir} is corrupt ({cause[:160]}); "
            "rerun `dvc repro --force sequences`"
        ) from None


def save_outputs(model: keras.Model, vocabulary: Vocabulary, state: dict, paths: TrainPaths,
                 resolved: autotune.Resolved, kernel: str) -> dict:
    """Save the model folder, the history, the steps and the run info; returns the final metrics."""
    optimizer.finalize_ema(model)  # the saved model is the weights' moving average, where kept
    history = state["history"]
    final = {"loss": history[-1]["loss"], "val_loss": history[-1]["val_loss"]}
    final["val_bpc"] = final["val_loss"] / math.log(2)
    model_lib.save_model_dir(model, vocabulary, paths.model)
    crash_point("final-model-saved")
    files.write_text(paths.history, history_csv(history))
    if paths.steps is not None:
        files.write_text(paths.steps, steps_csv(state.get("steps", [])))
    files.write_json(paths.run_info, training_run.what_trains(resolved, kernel))
    return final


# ---- training --------------------------------------------------------------------------------


def train(config: TrainConfig, paths: TrainPaths, experiment: str, params: dict, params_file: Path,
          corpus: dict | None, registered_model: str) -> dict | None:
    """Train (or resume), save the model folder, history, steps and run info, and log the run.

    ``params`` are every param of the run, flat (``train.rnn_units``), as logged to MLflow;
    ``corpus`` describes the corpus (``vectorize``'s ``corpus.json``). Returns the final metrics,
    or None on a multi-worker worker that is not the chief.
    """
    manifest, vocabulary = artifacts.training_inputs(paths.sequences, paths.vocabulary, config.batch_size)
    steps = steps_per_epoch(config, manifest)
    strategy = make_strategy(config.strategy)  # first: collective ops must be set up before others
    chief = is_chief(strategy)
    experiment_id = tracking.setup(experiment) if chief else None  # before any training: fail fast
    config, resolved = resolve_auto(config, len(vocabulary), manifest["seq_length"])
    key = resume_key(config, manifest)
    checkpoints = Checkpoints(paths.checkpoints)
    state, model, resumed, abandoned = resume_or_start(strategy, checkpoints, key, config, len(vocabulary), steps,
                                                       chief)
    initial_epoch = state["epoch"]
    kernel = lstm_cpu.kernel_path(model, config.batch_size, jit_fit(config))
    # What runs, in one line.
    print(f"train: precision {resolved.policy} ({resolved.why}); LSTM: {kernel} ({resolved.kernel_why})", flush=True)
    data = datasets(paths, manifest, config)

    if not chief:  # a worker that writes nothing: train in step with the others, then leave
        fit_distributed(model, strategy, config, data.train_shards, data.seq_length, data.val_ds, data.steps,
                        initial_epoch, [], 0)
        return None

    new_run = training_run.start(experiment_id, state, resumed, params, params_file)
    with training_run.ended_on_failure():
        training_run.adopt(state, abandoned)
        training_run.tag_what_trains(resolved, kernel)
        if new_run:
            training_run.record_new_run(params, key, model, vocabulary, manifest, corpus, state["history"],
                                        resolved.policy, resolved.kernel)
        callbacks = make_callbacks(config, data, vocabulary, checkpoints, state, new_run)
        fit(model, strategy, config, data, initial_epoch, callbacks, paths.sequences)
        final = save_outputs(model, vocabulary, state, paths, resolved, kernel)
        training_run.record_outputs(paths.model, paths.history, registered_model, final, params)
    # The run ends before the checkpoint goes: a kill in between resumes the finished run from its
    # last epoch (registering nothing twice); a kill after leaves a finished run and an idle folder.
    training_run.end()
    checkpoints.clear()
    crash_point("checkpoint-cleared")
    return final
