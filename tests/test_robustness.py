"""Reproducibility and interruption: same bytes twice; kill -9 mid-training, then resume."""

from __future__ import annotations

import json
import os
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


def test_kill_during_training_then_resume_matches_uninterrupted(tmp_path, corpus_text):
    reference = make_project(tmp_path / "reference", corpus_text, RESUME_PARAMS)
    dvc(reference, "repro")

    project = make_project(tmp_path / "killed", corpus_text, RESUME_PARAMS)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = project / "checkpoints/train/state.json"
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state_file.is_file():
            killed_at = json.loads(state_file.read_text())["epoch"]
            if killed_at >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None and 1 <= killed_at < 4, "the kill must land after epoch 1 and before the end"
    assert not (project / "models/char_rnn").exists()
    (stuck,) = _runs(project)
    assert stuck.info.status == "RUNNING"  # kill -9 gives MLflow no chance to close it

    result = dvc(project, "repro")
    assert "resuming from epoch" in result.stdout + result.stderr

    for path in ("models/char_rnn/model.keras", "metrics/history.csv", "metrics/evaluate.json", "samples/samples.txt"):
        assert (project / path).read_bytes() == (reference / path).read_bytes(), path
    (resumed,) = _runs(project)  # continued, not duplicated
    assert resumed.info.run_id == stuck.info.run_id and resumed.info.status == "FINISHED"
    steps = {m.step for m in mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "val_loss")}
    assert steps == {1, 2, 3, 4}


def test_a_failing_stage_marks_its_run_failed(tmp_path, corpus_text):
    project = make_project(tmp_path / "p", corpus_text)
    dvc(project, "repro", "sequences")
    manifest = json.loads((project / "data/sequences/manifest.json").read_text())
    shard = project / "data/sequences" / manifest["splits"]["val"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8  # same size, bad CRC
    shard.write_bytes(bytes(data))
    result = run([str(BIN / "python"), "stages/train.py", "--sequences", "data/sequences", "--vocabulary",
                  "data/vectorized/vocabulary.json", "--model", "models/char_rnn", "--checkpoints",
                  "checkpoints/train", "--history", "metrics/history.csv"], project, check=False)
    assert result.returncode != 0 and "corrupt" in result.stderr and "Traceback" not in result.stderr
    (failed,) = _runs(project)
    assert failed.info.status == "FAILED" and "corrupt" in failed.data.tags["charrnn.error"]
    assert not (project / "models/char_rnn").exists()
