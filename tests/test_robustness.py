"""Reproducibility and interruption: same bytes twice; a kill at any instant, then resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import mlflow
import pytest
import yaml

from conftest import BIN, dvc, make_project, run

pytestmark = pytest.mark.slow

# Slow enough per epoch that a kill lands between epochs, small enough for a test.
RESUME_PARAMS = {"train": {"epochs": 4, "steps_per_epoch": 25, "rnn_units": 48}}


def lock_outputs(project) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {(name, out["path"]): out.get("md5") for name, st in lock["stages"].items() for out in st.get("outs", [])}


def test_forced_repro_twice_gives_identical_outputs(tmp_path, corpus_text):
    project = make_project(tmp_path / "p", corpus_text)
    dvc(project, "repro")
    first = lock_outputs(project)
    dvc(project, "repro", "--force")
    assert lock_outputs(project) == first
    assert ("train", "models/char_rnn") in first and ("evaluate", "samples/samples.txt") in first


def _runs(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("tests")
    return mlflow.search_runs([experiment.experiment_id], output_format="list")


TRAIN_ARGV = [str(BIN / "python"), "stages/train.py", "--sequences", "data/sequences", "--vocabulary",
              "data/vectorized/vocabulary.json", "--corpus", "data/vectorized/corpus.json", "--model",
              "models/char_rnn", "--checkpoints", "checkpoints/train", "--history", "metrics/history.csv"]
RESULTS = ("models/char_rnn/model.keras", "metrics/history.csv")
CHARS_PER_EPOCH = 25 * 16 * 32  # RESUME_PARAMS steps x TINY_PARAMS batch x seq_length


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def _state_epoch(project) -> int:
    try:
        return json.loads((project / "checkpoints/train/state.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


# How each case interrupts the first training: a crash point (SIGKILL at a named instant of the
# checkpoint protocol or the final save), or a signal sent from outside after `epoch` epochs plus
# `delay` seconds (mid-epoch when delay > 0).
KILLS = {
    "sigkill-mid-epoch": dict(signal=signal.SIGKILL, epoch=1, delay=1.0),
    "crash-between-model-and-state": dict(crash="checkpoint-model-written@2"),
    "crash-before-old-model-removed": dict(crash="checkpoint-state-written@3"),
    "crash-after-final-model-saved": dict(crash="final-model-saved"),
    "sigterm-mid-epoch": dict(signal=signal.SIGTERM, epoch=1, delay=1.0),
    "sigint-mid-epoch": dict(signal=signal.SIGINT, epoch=2, delay=0.5),
}


def _interrupt(project, how) -> subprocess.CompletedProcess | int:
    if "crash" in how:
        result = subprocess.run(TRAIN_ARGV, cwd=project, env=_env({"CHARRNN_CRASH_AT": how["crash"]}),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        return result
    proc = subprocess.Popen(TRAIN_ARGV, cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and _state_epoch(project) < how["epoch"]:
        time.sleep(0.02)
    time.sleep(how["delay"])
    assert proc.poll() is None, "training ended before the kill"
    proc.send_signal(how["signal"])
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(TRAIN_ARGV, proc.returncode, out, err)


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, corpus_text):
    """A project with sequences built, and a reference: the same training, never interrupted."""
    root = tmp_path_factory.mktemp("kills")
    base = make_project(root / "base", corpus_text, RESUME_PARAMS)
    dvc(base, "repro", "sequences")
    reference = root / "reference"
    shutil.copytree(base, reference)
    run(TRAIN_ARGV, reference, env=_env())
    return root, base, reference


@pytest.mark.parametrize("name", list(KILLS))
def test_an_interrupted_training_resumes_to_the_same_bytes_and_one_true_record(trained_base, name):
    root, base, reference = trained_base
    project = root / name
    shutil.copytree(base, project)
    how = KILLS[name]
    first = _interrupt(project, how)
    checkpoint = project / "checkpoints/train"
    state = json.loads((checkpoint / "state.json").read_text())
    # A consistent checkpoint: state.json names a complete model file of the epoch it states.
    assert (checkpoint / state["model_file"]).is_file() and state["model_file"] == f"epoch-{state['epoch']:04d}.keras"
    assert len(state["history"]) == state["epoch"] >= 1
    (stuck,) = _runs(project)
    if how.get("signal") in (signal.SIGTERM, signal.SIGINT):  # a handled signal: a true record, one line
        assert first.returncode == 128 + how["signal"], first.stderr[-2000:]
        assert first.stderr.strip().splitlines()[-1].startswith("error: interrupted by SIG")
        assert "Traceback" not in first.stderr
        assert stuck.info.status == "KILLED"
    else:
        assert stuck.info.status == "RUNNING"  # kill -9 gives MLflow no chance to close it

    resumed = run(TRAIN_ARGV, project, env=_env())
    assert f"resuming from epoch {state['epoch']}" in resumed.stdout + resumed.stderr
    for path in RESULTS:
        assert (project / path).read_bytes() == (reference / path).read_bytes(), path
    assert [p.name for p in checkpoint.iterdir()] == ["state.json"]  # idle: nothing left to resume
    assert "model_file" not in json.loads((checkpoint / "state.json").read_text())
    (finished,) = _runs(project)  # continued, not duplicated
    assert finished.info.run_id == stuck.info.run_id and finished.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    for key in ("loss", "val_loss", "epoch", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(finished.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has duplicate points after the resume: {sorted(steps)}"
    val_steps = sorted(m.step for m in client.get_metric_history(finished.info.run_id, "val_loss"))
    assert val_steps == [e * CHARS_PER_EPOCH for e in (1, 2, 3, 4)]
    resumed_loss = {m.step: m.value for m in client.get_metric_history(finished.info.run_id, "loss")}
    (reference_run,) = _runs(reference)
    reference_loss = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(reference_run.info.run_id, "loss")}
    assert resumed_loss == reference_loss and len(reference_loss) == 4 * 25 // 2  # every log_every_steps


def test_a_resume_updates_raised_epochs_and_never_writes_into_a_deleted_run(trained_base):
    root, base, _ = trained_base
    project = root / "deleted-run"
    shutil.copytree(base, project)
    _interrupt(project, {"crash": "checkpoint-state-written@2"})
    (old,) = _runs(project)
    mlflow.MlflowClient().delete_run(old.info.run_id)  # as the UI's Delete does
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 5  # not part of the resume key while the learning rate is constant
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    resumed = run(TRAIN_ARGV, project, env=_env())
    output = resumed.stdout + resumed.stderr
    assert "resuming from epoch 2" in output and "Traceback" not in output
    notices = [line for line in output.splitlines() if "was deleted" in line]
    assert len(notices) == 1 and old.info.run_id in notices[0] and "new run" in notices[0]
    (new,) = _runs(project)  # the deleted run is not listed (nor written to)
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    assert new.data.params["train.epochs"] == "5"
    assert len((project / "metrics/history.csv").read_text().splitlines()) == 6  # header + 5 epochs
    val_steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(new.info.run_id, "val_loss"))
    assert val_steps == [e * CHARS_PER_EPOCH for e in range(1, 6)]  # the two epochs of the checkpoint too
    assert mlflow.get_run(old.info.run_id).info.lifecycle_stage == "deleted"


def test_a_failing_stage_marks_its_run_failed(tmp_path, corpus_text):
    project = make_project(tmp_path / "p", corpus_text)
    dvc(project, "repro", "sequences")
    manifest = json.loads((project / "data/sequences/manifest.json").read_text())
    shard = project / "data/sequences" / manifest["splits"]["val"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8  # same size, bad CRC
    shard.write_bytes(bytes(data))
    result = run(TRAIN_ARGV, project, check=False)
    assert result.returncode != 0 and "corrupt" in result.stderr and "Traceback" not in result.stderr
    (failed,) = _runs(project)
    assert failed.info.status == "FAILED" and "corrupt" in failed.data.tags["charrnn.error"]
    assert not (project / "models/char_rnn").exists()
