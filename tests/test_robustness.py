"""Reproducibility and interruption: same bytes twice; a kill at any instant, then resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import BIN, SYSTEM_METRICS_EVERY_SECOND, copy_project, dvc, run, write_params

pytestmark = pytest.mark.slow

# Four epochs to interrupt; the kills land at named steps and instants, not by timers.
STEPS_PER_EPOCH = 10
# Every lever that draws random numbers or keeps state in the optimizer is on, so the kills below
# prove each resumes to the same bytes (a decaying rate would tie the checkpoint to the epochs, which
# test_a_resume_updates_raised_epochs raises: tests/test_regularisation.py resumes the cool-down).
RESUME_PARAMS = {"train": {"epochs": 4, "steps_per_epoch": STEPS_PER_EPOCH, "rnn_units": 48, "weight_drop": 0.3,
                           "ema_momentum": 0.9, "ema_warmup": True, "weight_decay_on": "kernels",
                           "adam_beta_2": 0.99}}


def lock_outputs(project) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {(name, out["path"]): out.get("md5") for name, st in lock["stages"].items() for out in st.get("outs", [])}


def test_a_forced_repro_in_another_folder_gives_identical_outputs(trained_project, tmp_path):
    project = copy_project(trained_project, tmp_path / "p")
    first = lock_outputs(project)
    dvc(project, "repro", "--force")
    assert lock_outputs(project) == first
    # The same params again: the run's name is the commit's, made unique with -2.
    rev = run(["git", "rev-parse", "HEAD"], project).stdout.strip()[:7]
    assert sorted(r.info.run_name for r in _runs(project)) == [rev, f"{rev}-2"]
    assert ("train", "models/char_rnn") in first and ("evaluate", "samples/samples.txt") in first


def _client(project) -> mlflow.MlflowClient:
    """A client of the project's own store (not the global tracking URI: cases run in threads)."""
    return mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _runs(project):
    client = _client(project)
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id])


TRAIN_ARGV = [str(BIN / "python"), "stages/train.py", "--sequences", "data/sequences", "--vocabulary",
              "data/vectorized/vocabulary.json", "--corpus", "data/vectorized/corpus.json", "--model",
              "models/char_rnn", "--checkpoints", "checkpoints/train", "--history", "metrics/history.csv",
              "--run-info", "metrics/train.json"]
RESULTS = ("models/char_rnn/model.keras", "metrics/history.csv", "metrics/train.json")
CHARS_PER_EPOCH = STEPS_PER_EPOCH * 16 * 32  # RESUME_PARAMS steps x TINY_PARAMS batch x seq_length


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **SYSTEM_METRICS_EVERY_SECOND, **(extra or {})}


# One training interrupted nine times, each run resuming what the one before left (the first starts
# from scratch): a signal at an optimizer step (mid-epoch at 10 steps an epoch: `train-step@n` is the
# n-th step of that process), or SIGKILL at a named instant of the checkpoint protocol or the final
# save. Each link is pinned by what it leaves: the epoch state.json names, the checkpoint folder's
# files (an interrupted commit's leftovers stay until the next commit), whether the model folder and
# the loss history exist, the registered versions (False: untagged, True: tagged) and the run's status.
CHAIN = {
    "sigkill-mid-epoch": dict(
        crash="train-step@15", signal="KILL",
        leaves=dict(epoch=1, files={"state.json", "epoch-0001.keras"}, model=False, history=False, versions=[])),
    "crash-between-model-and-state": dict(
        crash="checkpoint-model-written@1",
        leaves=dict(epoch=1, files={"state.json", "epoch-0001.keras", "epoch-0002.keras"}, model=False,
                    history=False, versions=[])),
    "sigterm-mid-epoch": dict(
        crash="train-step@15", signal="TERM",
        leaves=dict(epoch=2, files={"state.json", "epoch-0002.keras"}, model=False, history=False, versions=[])),
    "crash-before-old-model-removed": dict(
        crash="checkpoint-state-written@1",
        leaves=dict(epoch=3, files={"state.json", "epoch-0002.keras", "epoch-0003.keras"}, model=False,
                    history=False, versions=[])),
    "sigint-mid-epoch": dict(
        crash="train-step@5", signal="INT",
        leaves=dict(epoch=3, files={"state.json", "epoch-0002.keras", "epoch-0003.keras"}, model=False,
                    history=False, versions=[])),
    "crash-after-final-model-saved": dict(
        crash="final-model-saved",
        leaves=dict(epoch=4, files={"state.json", "epoch-0004.keras"}, model=True, history=False, versions=[])),
    "crash-after-model-registered": dict(
        crash="model-registered",
        leaves=dict(epoch=4, files={"state.json", "epoch-0004.keras"}, model=True, history=True, versions=[False])),
    "crash-after-final-model-logged": dict(
        crash="final-model-logged",
        leaves=dict(epoch=4, files={"state.json", "epoch-0004.keras"}, model=True, history=True, versions=[True])),
    "crash-after-run-ended": dict(
        crash="run-ended",
        leaves=dict(epoch=4, files={"state.json", "epoch-0004.keras"}, model=True, history=True, versions=[True],
                    status="FINISHED")),
}
VERSION_TAGS = {"val_loss", "run_name"}


def _versions(project, run_id) -> list:
    return _client(project).search_model_versions(f"run_id = '{run_id}'")


def _interrupt(project, how) -> subprocess.CompletedProcess:
    """The train stage, stopped by the signal ``how`` names at the instant it names."""
    env = _env({"CHARRNN_CRASH_AT": how["crash"], "CHARRNN_CRASH_SIGNAL": how.get("signal", "KILL")})
    result = subprocess.run(TRAIN_ARGV, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    expected = -signal.SIGKILL if how.get("signal", "KILL") == "KILL" else 128 + signal.Signals[f"SIG{how['signal']}"]
    assert result.returncode == expected, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, trained_project):
    """A project with sequences built, whose next stage is train (RESUME_PARAMS)."""
    root = tmp_path_factory.mktemp("kills")
    return root, copy_project(trained_project, root / "base", upto="sequences", overrides=RESUME_PARAMS)


@dataclasses.dataclass
class Link:
    """What one interruption of the chain left, read before the next run resumes it."""

    run: subprocess.CompletedProcess
    state: dict
    files: set[str]
    model_saved: bool
    history_saved: bool
    stuck: object  # the MLflow run
    stuck_versions: list


@dataclasses.dataclass
class Chain:
    project: Path
    reference: Path
    links: dict[str, Link]
    leftovers: list[Path]
    resumed: subprocess.CompletedProcess  # the last run, which completes


@pytest.fixture(scope="module")
def kill_chain(trained_base):
    """The chain of interruptions, beside an uninterrupted reference training (one core each)."""
    root, base = trained_base
    reference, project = root / "reference", root / "chain"
    shutil.copytree(base, reference)
    shutil.copytree(base, project)
    with ThreadPoolExecutor(max_workers=1) as pool:
        uninterrupted = pool.submit(run, TRAIN_ARGV, reference, _env())
        links = {}
        for name, how in CHAIN.items():
            result = _interrupt(project, how)
            checkpoint = project / "checkpoints/train"
            (stuck,) = _runs(project)  # every resume continues the one run
            links[name] = Link(result, json.loads((checkpoint / "state.json").read_text()),
                               {p.name for p in checkpoint.iterdir()},
                               (project / "models/char_rnn/model.keras").is_file(),
                               (project / "metrics/history.csv").is_file(), stuck, _versions(project, stuck.info.run_id))
        # What a kill in the middle of an atomic write leaves: the next run removes it.
        leftovers = [project / "models/.char_rnn.k2j4x9.tmp", project / "metrics/.history.tmp.k2j4x9.csv"]
        leftovers[0].mkdir(parents=True, exist_ok=True)
        leftovers[1].write_text("epoch,chars\n")
        resumed = run(TRAIN_ARGV, project, env=_env())
        uninterrupted.result()
    return Chain(project, reference, links, leftovers, resumed)


@pytest.mark.parametrize("name", list(CHAIN))
def test_each_interruption_leaves_a_consistent_checkpoint_and_a_true_record(kill_chain, name):
    link, how = kill_chain.links[name], CHAIN[name]
    names = list(CHAIN)
    if names.index(name):  # a resume of the link before
        previous = kill_chain.links[names[names.index(name) - 1]]
        assert f"resuming from epoch {previous.state['epoch']}" in link.run.stdout + link.run.stderr
    # A consistent checkpoint: state.json names a complete model file of the epoch it states.
    state, leaves = link.state, how["leaves"]
    assert state["model_file"] in link.files and state["model_file"] == f"epoch-{state['epoch']:04d}.keras"
    assert len(state["history"]) == state["epoch"] == leaves["epoch"], state
    assert link.files == leaves["files"]
    assert link.model_saved == leaves["model"] and link.history_saved == leaves["history"]
    assert [VERSION_TAGS <= set(v.tags) for v in link.stuck_versions] == leaves["versions"], [
        v.tags for v in link.stuck_versions]
    stuck, first = link.stuck, link.run
    if how.get("signal") in ("TERM", "INT"):  # a handled signal: a true record, one line
        assert [line for line in first.stderr.splitlines() if line.startswith("error: ")] == [
            first.stderr.strip().splitlines()[-1]]
        assert first.stderr.strip().splitlines()[-1].startswith(f"error: interrupted by SIG{how['signal']}")
        assert "Traceback" not in first.stderr
        assert stuck.info.status == "KILLED" and f"SIG{how['signal']}" in stuck.data.tags["charrnn.error"]
    else:  # kill -9 gives MLflow no chance to close a run it kills
        assert stuck.info.status == leaves.get("status", "RUNNING")


def test_the_interrupted_training_resumes_to_the_same_bytes_and_one_true_record(kill_chain):
    project, reference, resumed = kill_chain.project, kill_chain.reference, kill_chain.resumed
    checkpoint = project / "checkpoints/train"
    assert "resuming from epoch 4" in resumed.stdout + resumed.stderr
    assert not [p for p in kill_chain.leftovers if p.exists()]
    for path in RESULTS:
        assert (project / path).read_bytes() == (reference / path).read_bytes(), path
    assert [p.name for p in checkpoint.iterdir()] == ["state.json"]  # idle: nothing left to resume
    assert "model_file" not in json.loads((checkpoint / "state.json").read_text())
    (finished,) = _runs(project)  # continued, not duplicated
    assert {link.stuck.info.run_id for link in kill_chain.links.values()} == {finished.info.run_id}
    assert finished.info.status == "FINISHED"
    assert "charrnn.error" not in finished.data.tags  # the interruptions are over: no stale error
    (version,) = _versions(project, finished.info.run_id)  # registered once, tagged
    assert VERSION_TAGS <= set(version.tags) and version.tags["run_name"] == finished.info.run_name
    assert float(version.tags["val_loss"]) == pytest.approx(finished.data.metrics["val_loss"], abs=1e-6)
    client = _client(project)
    assert {"loss", "val_loss", "epoch", "learning_rate", "tokens_per_second"} <= set(finished.data.metrics)
    assert any(key.startswith("system/") for key in finished.data.metrics)
    for key in finished.data.metrics:  # every metric the run logs, system/* included
        steps = [m.step for m in client.get_metric_history(finished.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has duplicate points after the resumes: {sorted(steps)}"
    val_steps = sorted(m.step for m in client.get_metric_history(finished.info.run_id, "val_loss"))
    assert val_steps == [e * CHARS_PER_EPOCH for e in (1, 2, 3, 4)]
    resumed_loss = {m.step: m.value for m in client.get_metric_history(finished.info.run_id, "loss")}
    (reference_run,) = _runs(reference)
    reference_loss = {m.step: m.value for m in _client(reference).get_metric_history(reference_run.info.run_id, "loss")}
    assert resumed_loss == reference_loss and len(reference_loss) == 4 * STEPS_PER_EPOCH // 2  # every log_every_steps


@pytest.fixture(scope="module")
def crashed_base(trained_base):
    """The base whose training was killed after committing epoch 2 (a RUNNING run, a checkpoint)."""
    root, base = trained_base
    crashed = root / "crashed"
    shutil.copytree(base, crashed)
    _interrupt(crashed, {"crash": "checkpoint-state-written@2"})
    return crashed


def _crashed(crashed_base: Path, dest: Path, **train):
    """A copy of the crashed base, its run, and ``train`` params set."""
    project = shutil.copytree(crashed_base, dest)
    (old,) = _runs(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project, old


def test_a_resume_updates_raised_epochs_and_never_writes_into_a_deleted_run(crashed_base, tmp_path):
    # epochs are not part of the resume key while the learning rate is constant
    project, old = _crashed(crashed_base, tmp_path / "deleted-run", epochs=5)
    _client(project).delete_run(old.info.run_id)  # as the UI's Delete does

    resumed = run(TRAIN_ARGV, project, env=_env())
    output = resumed.stdout + resumed.stderr
    assert "resuming from epoch 2" in output and "Traceback" not in output
    notices = [line for line in output.splitlines() if "was deleted" in line]
    assert len(notices) == 1 and old.info.run_id in notices[0] and "new run" in notices[0]
    (new,) = _runs(project)  # the deleted run is not listed (nor written to)
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    assert new.data.params["train.epochs"] == "5"
    assert len((project / "metrics/history.csv").read_text().splitlines()) == 6  # header + 5 epochs
    val_steps = sorted(m.step for m in _client(project).get_metric_history(new.info.run_id, "val_loss"))
    assert val_steps == [e * CHARS_PER_EPOCH for e in range(1, 6)]  # the two epochs of the checkpoint too
    assert _client(project).get_run(old.info.run_id).info.lifecycle_stage == "deleted"


def test_a_checkpoint_that_cannot_be_resumed_ends_its_run_killed_naming_the_new_one(crashed_base, tmp_path):
    project, old = _crashed(crashed_base, tmp_path / "abandoned", epochs=1, learning_rate=0.02)  # another resume key
    assert old.info.status == "RUNNING"

    output = run(TRAIN_ARGV, project, env=_env())
    assert "resuming" not in output.stdout + output.stderr
    runs = {r.info.run_id: r for r in _runs(project)}
    new = next(r for rid, r in runs.items() if rid != old.info.run_id)
    assert len(runs) == 2 and new.info.status == "FINISHED"
    ended = runs[old.info.run_id]
    assert ended.info.status == "KILLED" and "could not be resumed" in ended.data.tags["charrnn.error"]
    assert ended.data.tags["charrnn.superseded_by"] == new.info.run_id


def test_a_failing_stage_marks_its_run_failed(trained_base):
    root, base = trained_base
    project = root / "failing"
    shutil.copytree(base, project)
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


def _repro(project, crash: str | None = None):
    env = {**SYSTEM_METRICS_EVERY_SECOND, **({"CHARRNN_CRASH_AT": crash} if crash else {})}
    return dvc(project, "repro", env=env, check=crash is None)


def _one_version_per_run_and_none_running(project) -> list:
    runs = _runs(project)
    assert runs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_id, r.info.status) for r in runs]
    for r in runs:
        (version,) = _versions(project, r.info.run_id)
        assert VERSION_TAGS <= set(version.tags)
    return runs


def test_dvc_repro_killed_mid_training_then_after_the_checkpoint_is_cleared_keeps_one_true_record(trained_base):
    """Through `dvc repro`, as a user reruns it: killed mid-training, the rerun resumes into the same
    run and version; killed again at the stage's last instant (the run ended, the checkpoint cleared,
    but DVC saw the stage fail), the next rerun trains again as a second run with its own version.
    No run is left RUNNING, and the pipeline ends up to date."""
    root, base = trained_base
    project = root / "repro-kills"
    shutil.copytree(base, project)
    write_params(project, {"train": {"epochs": 2, "steps_per_epoch": 6}})

    assert _repro(project, "checkpoint-state-written@1").returncode != 0
    (first,) = _runs(project)
    assert first.info.status == "RUNNING"

    resumed = _repro(project, "checkpoint-cleared")
    assert resumed.returncode != 0 and "resuming from epoch 1" in resumed.stdout + resumed.stderr
    (finished,) = _one_version_per_run_and_none_running(project)
    assert finished.info.run_id == first.info.run_id
    assert json.loads((project / "checkpoints/train/state.json").read_text()).get("model_file") is None

    again = _repro(project)
    assert "resuming" not in again.stdout + again.stderr
    runs = _one_version_per_run_and_none_running(project)
    assert len(runs) == 2 and first.info.run_id in {r.info.run_id for r in runs}
    assert dvc(project, "status").stdout.strip() == "Data and pipelines are up to date."
