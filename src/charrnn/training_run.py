"""The MLflow run of a training: started or resumed, recorded once, its model logged and registered, ended.

A checkpoint keeps its run's id, so a training killed at any instant continues the same run on the
next ``dvc repro``; what a run records once (params, dataset, vocabulary, the model's version) is
recorded by the run that starts it or, after a kill in between, by the resume, never twice.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import keras
import mlflow
import tensorflow as tf

from charrnn import cell_ops, files, model as model_lib, tracking
from charrnn.checkpoints import RESUMABLE
from charrnn.faults import crash_point
from charrnn.autotune import Resolved
from charrnn.vocabulary import Vocabulary

# The curves TrainingCurves logs: a resumed run continues each after the last step it holds.
CURVES = ("loss", "learning_rate", "tokens_per_second", "val_loss", "epoch_loss", "epoch")


def start(experiment_id: str, state: dict, resumed: bool, params: dict, params_file: Path) -> bool:
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


@contextlib.contextmanager
def ended_on_failure():
    """A failure in the block ends the active run FAILED (KILLED after a signal) with the error
    recorded; when the tracking server is gone, the one-line error that says so is raised instead."""
    try:
        yield
    except BaseException as err:
        replacement = tracking.end_run_with_error(err)
        if replacement is not None:
            raise replacement from None
        raise


def adopt(state: dict, abandoned: str | None) -> str:
    """Keep the active run's id in the checkpoint state, and point ``abandoned`` (the run of an
    interrupted training these params could not resume) to it. Returns the run id."""
    run_id = mlflow.active_run().info.run_id
    state["run_id"] = run_id
    if abandoned:
        mlflow.MlflowClient().set_tag(abandoned, tracking.SUPERSEDED_BY_TAG, run_id)
    return run_id


def what_trains(resolved: Resolved, kernel: str) -> dict:
    """The precision, the LSTM path (``lstm_kernel_path``: train.lstm_kernel's value; ``lstm_kernel``:
    in words) and the train-step timings they were chosen on, in ms (``metrics/train.json``)."""
    return {"precision": resolved.policy, "lstm_kernel": kernel, "lstm_kernel_path": resolved.kernel,
            **({"bfloat16_speedup": resolved.speedup} if resolved.speedup else {}),
            **({"step_ms": {k: round(v * 1e3, 1) for k, v in resolved.step_seconds.items()}}
               if resolved.step_seconds else {})}


def tag_what_trains(resolved: Resolved, kernel: str) -> None:
    """The precision and the LSTM path (and why), the timings they were chosen on and the compiled
    ops' build, as run tags."""
    build = cell_ops.build_target()
    timings = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in (resolved.step_seconds or {}).items())
    mlflow.set_tags({"charrnn.precision": resolved.policy, "charrnn.precision_reason": resolved.why[:500],
                     "charrnn.lstm_kernel": kernel, "charrnn.lstm_kernel_path": resolved.kernel,
                     "charrnn.lstm_kernel_reason": resolved.kernel_why[:500],
                     "charrnn.ops_build": f"{build['isa']} ({' '.join(build['flags']) or 'generic'}); "
                                          f"{build['compiler']}" if build else "none (TensorFlow ops)",
                     **({"charrnn.bfloat16_speedup": f"{resolved.speedup:.3f}"} if resolved.speedup else {}),
                     **({"charrnn.step_ms": timings[:500]} if timings else {})})


def record_new_run(params: dict, key: str, model: keras.Model, vocabulary: Vocabulary, manifest: dict,
                   corpus: dict | None, history: list[dict], policy: str, kernel: str) -> None:
    """What a run records once: tags, params (but the resumable ones, logged at the end), the corpus
    as a dataset input, the vocabulary, and the epochs a resumed checkpoint already trained."""
    mlflow.set_tags({**tracking.source_tags(), tracking.RESUME_KEY_TAG: key})
    resumable = {f"train.{name}" for name in RESUMABLE}
    mlflow.log_params({**{k: v for k, v in params.items() if k not in resumable},
                       "data.vocab_size": len(vocabulary),
                       "data.train_windows": manifest["splits"]["train"]["windows"],
                       "model.parameters": model.count_params(), "train.precision_resolved": policy,
                       "train.lstm_kernel_resolved": kernel})
    mlflow.log_dict({"chars": vocabulary.chars}, "vocabulary.json")
    if corpus:
        tracking.log_corpus_input(corpus)
    for row in history:  # a checkpoint resumed into a new run (the old one was deleted)
        mlflow.log_metrics({"epoch": row["epoch"], "epoch_loss": row["loss"], "val_loss": row["val_loss"]},
                           step=row["chars"])


def logged_curves(run_id: str, new_run: bool) -> dict[str, int]:
    """The last step of each curve the run already holds (-1: none), so a resume logs none twice."""
    return {} if new_run else {k: max(tracking.logged_steps(run_id, k), default=-1) for k in CURVES}


def record_outputs(model_dir: Path, history_path: Path, registered_name: str, final: dict, params: dict) -> None:
    """The saved model's hash (what evaluate finds the run by), the history, the logged and
    registered model, and the resumable params at their final value (a resume may have raised
    ``train.epochs``), logged once."""
    mlflow.set_tag(tracking.MODEL_HASH_TAG, files.sha256_file(model_dir / model_lib.MODEL_FILE))
    mlflow.log_artifact(str(history_path))
    log_models(model_dir, registered_name, final)
    crash_point("final-model-logged")
    mlflow.log_params({f"train.{name}": params[f"train.{name}"] for name in RESUMABLE})


def log_models(model_dir: Path, registered_name: str, final: dict) -> None:
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


def end() -> None:
    """End the run FINISHED."""
    mlflow.end_run()
    crash_point("run-ended")
