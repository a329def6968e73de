"""Stage 3: train the model on the TFRecord shards, resumably, and record the run in MLflow.

Resumption: after every epoch the training state is committed to the checkpoint folder
(``charrnn.checkpoints``), which DVC keeps across re-runs (``persist: true``). A stage killed at any
instant picks up at the last committed epoch on the next ``dvc repro``, continues the same MLflow
run, and ends with the same bytes as an uninterrupted run: where a batch sits in the stream depends
only on its index (``charrnn.batches``), not on how many epochs this process ran. The checkpoint is
emptied once the final model is saved, so ``dvc repro --force`` retrains.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from pathlib import Path

import keras
import mlflow
import tensorflow as tf

from charrnn import cell_ops, files, lstm_cpu, model as model_lib, precision, sequences, tracking
from charrnn.batches import steps_per_epoch, training_dataset, validation_dataset
from charrnn.checkpoints import RESUMABLE, Checkpoints, EpochCheckpoint, resume_key
from charrnn.config import TrainConfig
from charrnn.distribute import fit_distributed, is_chief, make_strategy
from charrnn.errors import UserError
from charrnn.faults import crash_point
from charrnn.tracking_callbacks import EpochSamples, TrainingCurves
from charrnn.vocabulary import Vocabulary

CURVES = ("loss", "learning_rate", "tokens_per_second", "val_loss", "epoch_loss", "epoch")
HISTORY_FIELDS = ("epoch", "chars", "loss", "val_loss")


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


def check_data(manifest: dict, config: TrainConfig) -> None:
    train_windows = manifest["splits"]["train"]["windows"]
    if train_windows < config.batch_size:
        L = manifest["seq_length"]
        raise UserError(
            f"the training split has {train_windows} sequences of {L} characters, fewer than "
            f"train.batch_size={config.batch_size}: not one full batch; lower batch_size or "
            "seq_length, or use a longer corpus"
        )


def sample_prime(vocabulary: Vocabulary, val_paths: list[str], seq_length: int) -> str:
    """The per-epoch samples' prime: the tutorial's ``ROMEO: `` where the corpus has those
    characters, else the start of the validation text."""
    if not vocabulary.unknown("ROMEO: "):
        return "ROMEO: "
    first = next(iter(sequences.windows_dataset(val_paths[:1], seq_length)))
    return vocabulary.decode(first.numpy()[:16])


# ---- the MLflow run -----------------------------------------------------------------------------


def start_run(experiment_id: str, state: dict, resumed: bool, params: dict, params_file: Path) -> bool:
    """Continue the checkpoint's run, or start a named one. Returns True for a new run."""
    run_id = state.get("run_id") if resumed else None
    if run_id and not tracking.active_run_exists(run_id):
        print(f"MLflow run {run_id} of the checkpoint was deleted; recording this training in a new run",
              flush=True)
        run_id = None
    if run_id:
        mlflow.start_run(run_id=run_id, experiment_id=experiment_id, log_system_metrics=True)
        tracking.delete_tag(run_id, tracking.ERROR_TAG)  # the interruption it records is over
        return False
    rev, baseline = tracking.baseline_params(params_file, tuple({k.split(".")[0] for k in params}))
    changed = tracking.changed_params(params, baseline)
    mlflow.start_run(
        experiment_id=experiment_id,
        run_name=tracking.run_name(experiment_id, changed, rev),
        description=tracking.run_description(changed, rev),
        log_system_metrics=True,
    )
    return True


def record_new_run(params: dict, key: str, model: keras.Model, vocabulary: Vocabulary, manifest: dict,
                   corpus: dict | None, history: list[dict], policy: str) -> None:
    """What a run records once: tags, params (but the resumable ones, logged at the end), the corpus
    as a dataset input, the vocabulary, and the epochs a resumed checkpoint already trained."""
    mlflow.set_tags({**tracking.source_tags(), tracking.RESUME_KEY_TAG: key})
    resumable = {f"train.{name}" for name in RESUMABLE}
    mlflow.log_params({**{k: v for k, v in params.items() if k not in resumable},
                       "data.vocab_size": len(vocabulary),
                       "data.train_windows": manifest["splits"]["train"]["windows"],
                       "model.parameters": model.count_params(), "train.precision_resolved": policy})
    mlflow.log_dict({"chars": vocabulary.chars}, "vocabulary.json")
    if corpus:
        mlflow.log_input(tracking.corpus_dataset(corpus), context="training")
    for row in history:  # a checkpoint resumed into a new run (the old one was deleted)
        mlflow.log_metrics({"epoch": row["epoch"], "epoch_loss": row["loss"], "val_loss": row["val_loss"]},
                           step=row["chars"])


# ---- training --------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    sequences_dir: Path,
    vocabulary_path: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    history_path: Path,
    experiment: str,
    params: dict,
    params_file: Path,
    corpus: dict | None,
    registered_model: str,
    run_info_path: Path,
    steps_path: Path | None = None,
) -> dict | None:
    """Train (or resume), save the model folder, history (per epoch, and ``steps_path`` per logged
    step) and run info, and log the run.

    ``params`` are every param of the run, flat (``train.rnn_units``), as logged to MLflow;
    ``corpus`` describes the corpus (``vectorize``'s ``corpus.json``). Returns the final metrics,
    or None on a multi-worker worker that is not the chief.
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
    policy, why, speedup = precision.resolve(config.precision, config, len(vocabulary), manifest["seq_length"])
    config = dataclasses.replace(config, precision=policy)
    configure_determinism(config)
    seq_length = manifest["seq_length"]
    chars_per_step = config.batch_size * seq_length
    key = resume_key(config, manifest)
    checkpoints = Checkpoints(checkpoint_dir)

    abandoned = None  # the run of an interrupted training that these params cannot resume
    with strategy.scope():
        loaded = checkpoints.load(key, config.epochs)
        if loaded:
            state, model = loaded
            lstm_cpu.install_model(model)  # the same kernel as the uninterrupted run: the same bytes
            print(f"resuming from epoch {state['epoch']} ({checkpoint_dir})", flush=True)
        else:
            if chief:
                abandoned = checkpoints.interrupted_run_id()
                if abandoned:
                    tracking.end_abandoned_run(abandoned)
                checkpoints.clear()
            state = {"key": key, "epoch": 0, "history": [], "run_id": None}
            model = model_lib.model_from_config(len(vocabulary), config)
            lstm_cpu.install_model(model)  # before compile: the fast CPU LSTM (a no-op with a GPU)
            schedule = model_lib.learning_rate_schedule(config.learning_rate, config.epochs * steps,
                                                        config.lr_decay_fraction)
            model_lib.compile_model(model, schedule, config.clipnorm, weight_decay=config.weight_decay,
                                    ema_momentum=config.ema_momentum)
        if config.jit_compile and config.strategy == "default":
            # Recompiling keeps the optimizer (and its restored state); only the train step changes.
            model.compile(optimizer=model.optimizer, loss=model.loss, jit_compile=True)
    initial_epoch = state["epoch"]
    kernel = lstm_cpu.kernel_path(model, config.batch_size, config.jit_compile and config.strategy == "default")
    print(f"train: precision {policy} ({why}); LSTM: {kernel}", flush=True)  # what runs, in one line

    train_shards = list(zip(sequences.shard_paths(sequences_dir, manifest, "train"),
                            [s["windows"] for s in manifest["splits"]["train"]["shards"]]))
    val_windows = manifest["splits"]["val"]["windows"]
    val_paths = sequences.shard_paths(sequences_dir, manifest, "val")
    val_ds = validation_dataset(val_paths, seq_length, config.batch_size, val_windows)
    if config.validation_steps:
        val_ds = val_ds.take(config.validation_steps)  # the same leading val batches every epoch

    if not chief:  # a worker that writes nothing: train in step with the others, then leave
        fit_distributed(model, strategy, config, train_shards, seq_length, val_ds, steps, initial_epoch, [], 0)
        return None

    new_run = start_run(experiment_id, state, bool(loaded), params, params_file)
    try:
        run_id = mlflow.active_run().info.run_id
        state["run_id"] = run_id
        if abandoned:
            mlflow.MlflowClient().set_tag(abandoned, tracking.SUPERSEDED_BY_TAG, run_id)
        build = cell_ops.build_target()
        mlflow.set_tags({"charrnn.precision": policy, "charrnn.precision_reason": why[:500],
                         "charrnn.lstm_kernel": kernel,
                         "charrnn.ops_build": f"{build['isa']} ({' '.join(build['flags']) or 'generic'}); "
                                              f"{build['compiler']}" if build else "none (TensorFlow ops)",
                         **({"charrnn.bfloat16_speedup": f"{speedup:.3f}"} if speedup else {})})
        if new_run:
            record_new_run(params, key, model, vocabulary, manifest, corpus, state["history"], policy)
        logged = {} if new_run else {k: max(tracking.logged_steps(run_id, k), default=-1) for k in CURVES}
        callbacks = [
            TrainingCurves(config.log_every_steps, chars_per_step, logged, log_model_info=new_run,
                           steps=state.setdefault("steps", [])),
            EpochSamples(vocabulary, sample_prime(vocabulary, val_paths, seq_length)),
            EpochCheckpoint(checkpoints, state, chars_per_step),
        ]
        if config.ema_momentum:  # val_loss of the moving average: the weights the model is saved with
            callbacks.append(keras.callbacks.SwapEMAWeights())
        if initial_epoch < config.epochs:
            try:
                if config.strategy != "default":  # the replicas' gradients summed before the clip
                    fit_distributed(model, strategy, config, train_shards, seq_length, val_ds, steps,
                                    initial_epoch, callbacks, 1)
                else:
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
        model_lib.finalize_ema(model)  # the saved model is the weights' moving average, where kept
        history = state["history"]
        final = {"loss": history[-1]["loss"], "val_loss": history[-1]["val_loss"]}
        final["val_bpc"] = final["val_loss"] / math.log(2)

        model_lib.save_model_dir(model, vocabulary, Path(model_dir))
        crash_point("final-model-saved")
        files.write_text(history_path, history_csv(history))
        if steps_path is not None:
            files.write_text(steps_path, steps_csv(state.get("steps", [])))
        files.write_json(run_info_path, {"precision": policy, "lstm_kernel": kernel,
                                         **({"bfloat16_speedup": speedup} if speedup else {})})
        mlflow.set_tag(tracking.MODEL_HASH_TAG, files.sha256_file(Path(model_dir) / model_lib.MODEL_FILE))
        mlflow.log_artifact(str(history_path))
        log_models(model, len(vocabulary), Path(model_dir), registered_model, final)
        crash_point("final-model-logged")
        # Resumable params (a resume may have raised train.epochs) are logged once, with their final value.
        mlflow.log_params({f"train.{name}": params[f"train.{name}"] for name in RESUMABLE})
    except BaseException as err:
        replacement = tracking.end_run_with_error(err)  # one line when the tracking server is gone
        if replacement is not None:
            raise replacement from None
        raise
    # The run ends before the checkpoint goes: a kill in between resumes the finished run from its
    # last epoch (registering nothing twice); a kill after leaves a finished run and an idle folder.
    mlflow.end_run()
    crash_point("run-ended")
    checkpoints.clear()
    crash_point("checkpoint-cleared")
    return final


def log_models(model: keras.Model, vocab_size: int, model_dir: Path, registered_name: str, final: dict) -> None:
    """Log the trained model once, as the text generator (``model``: prime -> text; its
    ``model_dir`` artifact holds ``model.keras`` without optimizer state and ``vocabulary.json``,
    and ``unwrap_python_model().model`` is the Keras model), and register it as a new version of
    ``registered_name``, tagged with the run's validation loss and DVC experiment. A run resumed
    after a kill in here registers once."""
    from charrnn import serving

    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    registered = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    if registered:  # logged and registered before a kill: only the tags may be missing
        version = registered[0].version
    else:
        # Pinning requirements skips MLflow's slow inference (it reloads the model in a subprocess).
        requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                        f"mlflow=={mlflow.__version__}"]
        info = serving.log_text_generator(model_dir, registered_name, requirements)
        version = info.registered_model_version
        crash_point("model-registered")
    tags = {"val_loss": f"{final['val_loss']:.6f}", "run_name": run.info.run_name,
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "")}
    present = client.get_model_version(registered_name, version).tags
    for key, value in tags.items():
        if value and present.get(key) != value:
            client.set_model_version_tag(registered_name, version, key, value)
    print(f"registered model version: models:/{registered_name}/{version}", flush=True)
