"""Distributed training: two worker processes on 127.0.0.1 train the tiny model together; `mirrored`
on two logical CPUs (CHARRNN_CPU_REPLICAS) trains as one device and resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import BIN, copy_project, run, write_params

pytestmark = pytest.mark.slow

# The pipeline's two workers shuffle their own halves of the windows, so they see other batches
# than one process does: their losses agree only statistically (the step itself is compared
# exactly in test_one_step_on_two_workers_equals_the_single_device_step).
LOSS_TOLERANCE = 0.05
STEP_SCRIPT = Path(__file__).with_name("multi_worker_steps.py")
TRAIN_CMD = ["stages/train.py", "--sequences", "data/sequences", "--vocabulary", "data/vectorized/vocabulary.json",
             "--corpus", "data/vectorized/corpus.json",
             "--model", "models/char_rnn", "--checkpoints", "checkpoints/train", "--history", "metrics/history.csv",
             "--run-info", "metrics/train.json", "--steps", "metrics/steps.csv"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(project, count: int, argv=None, env=None) -> list[subprocess.Popen]:
    """``count`` processes (the train stage, or ``argv(index)``) forming one MultiWorkerMirroredStrategy
    cluster on 127.0.0.1, with ``env(index)`` added to their environment."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(count)]
    procs = []
    for index in range(count):
        worker_env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env(index) if env else {})}
        worker_env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        command = argv(index) if argv else [sys.executable, *TRAIN_CMD]
        procs.append(subprocess.Popen(command, cwd=project, env=worker_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_all(procs, timeout=300) -> list[str]:
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outputs)
    return outputs


def final_val_loss(project) -> float:
    rows = list(csv.DictReader((project / "metrics/history.csv").open()))
    return float(rows[-1]["val_loss"])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, trained_project):
    """The trained project stepped back to its sequences, rebuilt as several small shards (workers
    split the windows across files); its next stage is train."""
    base = copy_project(trained_project, tmp_path_factory.mktemp("sharded") / "base", upto="vectorize",
                        overrides={"sequences": {"shard_size_mb": 0.03}})
    run([sys.executable, "stages/sequences.py", "--vectorized", "data/vectorized", "--out", "data/sequences"], base)
    manifest = json.loads((base / "data/sequences/manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    return base


def with_params(base: Path, dest: Path, train: dict) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    write_params(dest, {"sequences": {"shard_size_mb": 0.03}, "train": train})
    return dest


def test_two_workers_train_together(tmp_path, sharded):
    single = with_params(sharded, tmp_path / "single", {})
    run([sys.executable, *TRAIN_CMD], single)
    project = with_params(sharded, tmp_path / "multi", {"strategy": "multi_worker"})
    wait_all(start_workers(project, 2))

    assert abs(final_val_loss(project) - final_val_loss(single)) < LOSS_TOLERANCE
    assert len((project / "metrics/history.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert [p.name for p in (project / "checkpoints/train").iterdir()] == ["state.json"]  # idle
    generated = run([str(BIN / "charrnn"), "generate", "--model", "models/char_rnn", "--length", "50",
                     "--seed", "1"], project)
    assert generated.stdout.startswith("ROMEO: ") and len(generated.stdout.rstrip("\n")) == 57


def test_a_checkpoint_from_two_workers_resumes_on_one(tmp_path, sharded):
    """Two workers are killed mid-epoch 2; one worker resumes the same run from their checkpoint."""
    project = with_params(sharded, tmp_path / "p",
                          {"strategy": "multi_worker", "epochs": 4, "steps_per_epoch": 10, "rnn_units": 48})
    # The chief (which writes the checkpoints) is killed after step 15, the other worker right after.
    chief, other = start_workers(project, 2, env=lambda index: {"CHARRNN_CRASH_AT": "train-step@15"} if index == 0 else {})
    chief.communicate(timeout=300)
    os.killpg(other.pid, signal.SIGKILL)
    other.communicate(timeout=60)
    assert chief.returncode == -signal.SIGKILL, "the chief was not killed at its crash point"
    killed = json.loads((project / "checkpoints/train/state.json").read_text())
    assert killed["epoch"] == 1
    assert not (project / "models/char_rnn").exists()

    (output,) = wait_all(start_workers(project, 1))
    assert f"resuming from epoch {killed['epoch']}" in output

    rows = list(csv.DictReader((project / "metrics/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for row, before in zip(rows, killed["history"]):  # the two workers' epochs are kept as they were
        assert float(row["val_loss"]) == pytest.approx(before["val_loss"], abs=1e-6)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])  # training went on from the checkpoint

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (resumed,) = mlflow.search_runs([mlflow.get_experiment_by_name("tests").experiment_id], output_format="list")
    assert resumed.info.run_id == killed["run_id"] and resumed.info.status == "FINISHED"
    steps = {m.step for m in mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "val_loss")}
    assert steps == {epoch * 10 * 16 * 32 for epoch in (1, 2, 3, 4)}  # characters trained at each epoch end
    # The optimizer's step count went on from the checkpoint: the last training-loss point (logged at
    # the optimizer's step x characters per step) is at 4 epochs x 10 steps, in MLflow and in DVC's plot.
    loss_steps = [m.step for m in mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "loss")]
    assert max(loss_steps) == 4 * 10 * 16 * 32
    plotted = list(csv.DictReader((project / "metrics/steps.csv").open()))
    assert [int(r["chars"]) for r in plotted] == sorted(set(loss_steps))


def _weights(path) -> tuple[list[np.ndarray], dict]:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        return [data[f"arr_{i}"] for i in range(len(data.files) - 1)], meta


def _max_relative_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)) for x, y in zip(a, b))


# One process trains the single-process variants, a cluster of two the multi-worker ones, side by side.
SINGLE_VARIANTS = ("single", "mirrored", "mirrored-per-replica", "single-mixed_float16")
CLUSTER_VARIANTS = ("combined", "per-replica", "combined-mixed_float16")


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """Three optimizer steps of every variant of ``multi_worker_steps.py``: their weights and meta."""
    out = tmp_path_factory.mktemp("steps")
    cluster = start_workers(out, 2, lambda i: [sys.executable, str(STEP_SCRIPT), str(out), *CLUSTER_VARIANTS])
    run([sys.executable, str(STEP_SCRIPT), str(out), *SINGLE_VARIANTS], out)
    wait_all(cluster)
    return {path.stem: _weights(path) for path in out.glob("*.npz")}


def test_one_step_on_two_workers_equals_the_single_device_step(steps):
    """Clipping on (clipnorm far below the gradient norm), the default AdamW (whose decoupled decay
    must happen once per global step): two workers, each with half of every global batch, end with
    the weights one device reaches on the whole batches, and with each other's."""
    single, single_meta = steps["single"]
    (w0, meta0), (w1, _) = steps["combined-0"], steps["combined-1"]
    assert meta0["iterations"] == single_meta["iterations"] == 3
    assert meta0["optimizer"] == single_meta["optimizer"] == "AdamW"
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)  # the workers hold one model
    assert _max_relative_difference(w0, single) < 1e-5
    assert meta0["losses"] == pytest.approx(single_meta["losses"], rel=1e-5)
    # The control: clipping each worker's half-gradient before the sum trains another model.
    naive, _ = steps["per-replica-0"]
    assert _max_relative_difference(naive, single) > 1e-3


def test_mirrored_replicas_step_as_one_device(steps):
    """`train.strategy: mirrored` on two logical CPUs, the default AdamW, clipnorm far below the
    gradient norm: after 3 steps the weights equal one device's on the same global batches; the
    per-replica clip (Keras' fit under a strategy) misses by far more."""
    single, single_meta = steps["single"]
    mirrored, meta = steps["mirrored"]
    assert meta["iterations"] == single_meta["iterations"] == 3 and meta["optimizer"] == "AdamW"
    assert _max_relative_difference(mirrored, single) < 1e-5
    assert meta["losses"] == pytest.approx(single_meta["losses"], rel=1e-5)
    naive, _ = steps["mirrored-per-replica"]
    assert _max_relative_difference(naive, single) > 1e-3


def test_mixed_float16_scales_the_loss_on_two_workers_as_on_one(steps):
    single, single_meta = steps["single-mixed_float16"]
    (w0, meta0), (w1, _) = steps["combined-mixed_float16-0"], steps["combined-mixed_float16-1"]
    assert single_meta["optimizer"] == meta0["optimizer"] == "LossScaleOptimizer"
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert _max_relative_difference(w0, single) < 1e-3  # float16 activations: round-off of 1e-3


def test_workers_get_equal_shares_and_every_window_once_per_pass():
    from charrnn.distribute import worker_windows

    shards = [("a", 7), ("b", 3), ("c", 11), ("d", 2)]  # 23 windows, uneven files
    for workers in (1, 2, 3, 4):
        pieces = [worker_windows(shards, w, workers) for w in range(workers)]
        seen = [(path, skip + k) for share in pieces for path, skip, take in share for k in range(take)]
        assert len(seen) == len(set(seen)) == 23 // workers * workers  # each window at most once
        assert {sum(take for _, _, take in share) for share in pieces} == {23 // workers}  # equal shares


def test_each_window_is_seen_once_per_pass_over_uneven_shards(tmp_path):
    """Through the real stream: uneven TFRecord shards, 1-3 workers, one pass of every worker's
    batches covers each window at most once, all but fewer than workers x local batch of them."""
    from charrnn.batches import training_dataset
    from conftest import defaults
    from charrnn.distribute import worker_windows
    from charrnn.sequences import write_shards

    seq_length = 2
    ids = np.arange(2 * 101 + 1)  # window k starts with id 2k: its identity
    info = write_shards(ids, seq_length, tmp_path, "train", shard_bytes=600)
    shards = [(str(tmp_path / s["file"]), s["windows"]) for s in info["shards"]]
    assert len({n for _, n in shards}) > 1 and info["windows"] == 101  # uneven
    for workers in (1, 2, 3):
        local = defaults("train", batch_size=4 * workers, shuffle_buffer=7, seed=3)
        batch = local.batch_size // workers
        seen = []
        for w in range(workers):
            pieces = worker_windows(shards, w, workers)
            per_pass = sum(take for _, _, take in pieces) // batch
            stream = training_dataset(pieces, seq_length, 0, batch_size=batch, shuffle_buffer=7, seed=3)
            seen += [int(x[0]) // 2 for xs, _ in stream.take(per_pass) for x in xs.numpy()]
        assert len(seen) == len(set(seen)), f"{workers} workers: a window twice in one pass"
        assert 101 - len(seen) < workers * batch + workers, f"{workers} workers left out {101 - len(seen)}"


# ---- `train.strategy: mirrored` on two logical CPUs, through the train stage ----------------------

TWO_CPU_REPLICAS = {"CHARRNN_CPU_REPLICAS": "2"}
# Measured (TINY_PARAMS, dropout off, clipnorm 0.05, AVX-512 Xeon): `default` and `mirrored` on two
# replicas differ by at most 2e-6 in the logged losses (printed to 6 decimals) and 4.1e-6 in the final
# weights (relative to each tensor's largest): float rounding of the split batch and the all-reduce.
# Taking other batches, or clipping each replica's half-gradient, misses by more than 1e-3.
LOSS_TOLERANCE_MIRRORED = 6e-6
WEIGHT_TOLERANCE_MIRRORED = 1.2e-5


@pytest.fixture(scope="module")
def next_is_train(tmp_path_factory, trained_project):
    """The trained project stepped back to its sequences: its next stage is train."""
    return copy_project(trained_project, tmp_path_factory.mktemp("mirrored") / "base", upto="sequences")


def train_copy(base: Path, dest: Path, train: dict) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    write_params(dest, {"train": train})
    return dest


def _losses(project) -> dict[str, list[float]]:
    history = list(csv.DictReader((project / "metrics/history.csv").open()))
    steps = list(csv.DictReader((project / "metrics/steps.csv").open()))
    return {"loss": [float(r["loss"]) for r in history], "val_loss": [float(r["val_loss"]) for r in history],
            "step_loss": [float(r["loss"]) for r in steps], "chars": [int(r["chars"]) for r in history]}


def test_mirrored_on_two_cpu_replicas_trains_as_one_device(tmp_path, next_is_train):
    """Dropout off (each replica draws the same mask, see README), clipnorm far below the gradient
    norm: the train stage under `mirrored` with two replicas logs the losses of `default` step by
    step and ends with its weights, to float rounding."""
    from charrnn.model import load_keras

    train = {"dropout": 0.0, "clipnorm": 0.05}
    single = train_copy(next_is_train, tmp_path / "single", train)
    mirrored = train_copy(next_is_train, tmp_path / "mirrored", {**train, "strategy": "mirrored"})
    with ThreadPoolExecutor(max_workers=2) as pool:  # one core each
        jobs = [pool.submit(run, [sys.executable, *TRAIN_CMD], single),
                pool.submit(run, [sys.executable, *TRAIN_CMD], mirrored, TWO_CPU_REPLICAS)]
        out = [job.result() for job in jobs][-1]
    assert "train: strategy mirrored, 2 replica(s) in sync (here: CPU:0, CPU:1)" in out.stdout

    a, b = _losses(single), _losses(mirrored)
    assert a["chars"] == b["chars"] == [12 * 16 * 32, 24 * 16 * 32]  # the same steps, of global batches
    assert len(a["step_loss"]) == len(b["step_loss"]) == 12
    for key in ("loss", "val_loss", "step_loss"):
        assert np.max(np.abs(np.subtract(a[key], b[key]))) < LOSS_TOLERANCE_MIRRORED, (key, a[key], b[key])
    weights = [load_keras(p / "models/char_rnn/model.keras").get_weights() for p in (single, mirrored)]
    assert _max_relative_difference(weights[1], weights[0]) < WEIGHT_TOLERANCE_MIRRORED


def test_mirrored_resumes_mid_epoch_kills_to_the_same_bytes(tmp_path, next_is_train):
    """Two CPU replicas, dropout on: a run killed mid-epoch 2, its resume killed mid-epoch 3 and
    resumed again ends with the bytes of the uninterrupted mirrored run: each resume takes up the
    data stream at the step it stopped, R per-replica batches a step."""
    train = {"strategy": "mirrored", "epochs": 3}
    reference = train_copy(next_is_train, tmp_path / "reference", train)
    pool = ThreadPoolExecutor(max_workers=1)  # beside the kills, on the other core
    uninterrupted = pool.submit(run, [sys.executable, *TRAIN_CMD], reference, TWO_CPU_REPLICAS)

    project = train_copy(next_is_train, tmp_path / "killed", train)
    # The n-th optimizer step of the process: step 18 of 36 is mid-epoch 2; the first resume starts
    # at step 12, so its 18th is step 30, mid-epoch 3.
    for resumed_from in (None, 1):
        killed = run([sys.executable, *TRAIN_CMD], project, check=False,
                     env={**TWO_CPU_REPLICAS, "CHARRNN_CRASH_AT": "train-step@18"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        if resumed_from:
            assert f"resuming from epoch {resumed_from}" in killed.stdout
        state = json.loads((project / "checkpoints/train/state.json").read_text())
        assert state["epoch"] == (resumed_from or 0) + 1 and not (project / "models/char_rnn").exists()
    final = run([sys.executable, *TRAIN_CMD], project, env=TWO_CPU_REPLICAS)
    assert "resuming from epoch 2" in final.stdout
    uninterrupted.result()
    pool.shutdown()

    for path in ("models/char_rnn/model.keras", "metrics/history.csv", "metrics/steps.csv"):
        assert (project / path).read_bytes() == (reference / path).read_bytes(), path


def test_per_replica_slices_of_each_step_are_the_single_device_batch(tmp_path):
    """The stream of one pipeline feeding R replicas: the R batches of step s, end to end, are
    step s's global batch on one device, across pass boundaries and from any resumed step
    (101 windows: 12 global batches of 8 a pass, but 25 per-replica batches of 4, 33 of 3)."""
    from charrnn.batches import training_dataset
    from charrnn.distribute import worker_windows
    from charrnn.sequences import write_shards

    seq_length = 2
    info = write_shards(np.arange(2 * 101 + 1), seq_length, tmp_path, "train", shard_bytes=600)
    shards = [(str(tmp_path / s["file"]), s["windows"]) for s in info["shards"]]
    for replicas, global_batch in ((2, 8), (3, 12)):
        shuffling = dict(shuffle_buffer=7, seed=3)
        per_pass = 101 // global_batch
        for start in (0, 5, per_pass - 1, per_pass + 3):
            single = [xs.numpy() for xs, _ in
                      training_dataset(shards, seq_length, start, batch_size=global_batch, **shuffling).take(per_pass + 2)]
            stream = training_dataset(worker_windows(shards, 0, 1), seq_length, start * replicas,
                                      batch_size=global_batch // replicas, replicas=replicas, **shuffling)
            parts = [xs.numpy() for xs, _ in stream.take((per_pass + 2) * replicas)]
            steps = [np.concatenate(parts[i:i + replicas]) for i in range(0, len(parts), replicas)]
            assert len(steps) == len(single)
            for s, (got, want) in enumerate(zip(steps, single)):
                np.testing.assert_array_equal(got, want, err_msg=f"R={replicas}, from step {start}: step {s}")


def test_cpu_replicas_setting_is_checked(monkeypatch):
    from charrnn.errors import UserError
    from charrnn.threads import REPLICAS_ENV, cpu_replicas_from_env

    monkeypatch.setenv(REPLICAS_ENV, "2")
    assert cpu_replicas_from_env() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(REPLICAS_ENV, bad)
        with pytest.raises(UserError, match=REPLICAS_ENV):
            cpu_replicas_from_env()
