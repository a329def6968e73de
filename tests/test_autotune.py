"""``auto`` precision and LSTM path: the train step timed once per shape in every candidate, cached
under a lock, explained in one clause; each path forced trains to the same losses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from charrnn.autotune import AUTO_BFLOAT16_MIN_SPEEDUP, KERNEL_TIE
from conftest import REPO, copy_project, defaults, dvc, missing_prerequisite

TINY = dict(batch_size=4, embedding_dim=8, rnn_units=16, num_layers=1, cell="lstm", jit_compile=False)
PATHS = ("sequence", "cell", "tf")


def cache(tmp_path) -> dict:
    return json.loads((tmp_path / "charrnn" / "autotune.json").read_text())


def test_auto_times_every_precision_and_path_once_and_picks_the_fastest(tmp_path, monkeypatch):
    """Six variants timed in one child (here a stand-in; the train stage's test below times for real)
    and cached; the choice follows the timings (bfloat16 only at AUTO_BFLOAT16_MIN_SPEEDUP, the
    fastest path, ties to the first); a cached entry decides from then on, and a forced path needs no
    timing of the others."""
    import dataclasses

    from charrnn import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    asked = []
    measured = {"float32/sequence": 0.20, "float32/cell": 0.30, "float32/tf": 0.35,
                "mixed_bfloat16/sequence": 0.19, "mixed_bfloat16/cell": 0.25, "mixed_bfloat16/tf": 0.30}
    monkeypatch.setattr(autotune, "_measure_in_child", lambda shape, variants: asked.append((shape, variants)) or {
        v: measured[v] for v in variants})
    config = defaults("train", **TINY, precision="auto", lstm_kernel="auto")
    resolved = autotune.resolve(config, 11, 12, PATHS)
    ((shape, variants),) = asked
    assert shape == autotune.probe_shape(config, 11, 12) and sorted(variants) == sorted(measured)
    ((key, entry),) = cache(tmp_path).items()
    assert key.endswith("|vocab_size=11,seq_length=12,batch_size=4,embedding_dim=8,rnn_units=16,num_layers=1,"
                        "cell=lstm,jit_compile=False")
    assert sorted(entry["timed"]) == sorted(measured) and {k: entry[k] for k in measured} == measured
    # bfloat16 at 0.20 / 0.19 = 1.05x: float32, on its fastest path; the timings recorded with the run.
    assert (resolved.policy, resolved.speedup, resolved.kernel) == ("float32", 1.053, "sequence")
    assert resolved.why.startswith("auto: a train step in bfloat16 ran 1.05x float32's speed on this machine")
    assert resolved.kernel_why == "auto: the fastest train step, 200 ms (against cell 300 ms, tf 350 ms)"
    assert resolved.step_seconds == measured

    def rewrite(**seconds):
        stored = cache(tmp_path)
        stored[key].update(seconds)
        (tmp_path / "charrnn" / "autotune.json").write_text(json.dumps(stored))

    monkeypatch.setattr(autotune, "_measure_in_child", lambda *args: pytest.fail("measured again"))
    assert autotune.resolve(config, 11, 12, PATHS) == resolved
    # float32, cell the fastest; then tf within the tie of sequence (the first in KERNELS wins).
    rewrite(**{"float32/sequence": 0.2, "float32/cell": 0.1, "float32/tf": 0.3, "mixed_bfloat16/sequence": 0.5,
               "mixed_bfloat16/cell": 0.5, "mixed_bfloat16/tf": 0.5})
    chosen = autotune.resolve(config, 11, 12, PATHS)
    assert (chosen.policy, chosen.kernel) == ("float32", "cell")
    rewrite(**{"float32/cell": 0.3, "float32/tf": 0.2 / (KERNEL_TIE - 0.01)})
    assert autotune.resolve(config, 11, 12, PATHS).kernel == "sequence"
    # bfloat16 at 2x: bfloat16, and its own fastest path.
    rewrite(**{"mixed_bfloat16/tf": 0.09})
    chosen = autotune.resolve(config, 11, 12, PATHS)
    assert (chosen.policy, chosen.kernel) == ("mixed_bfloat16", "tf")
    # Forced: the path asked for, timed with the precision only where precision is auto.
    forced = autotune.resolve(dataclasses.replace(config, lstm_kernel="cell"), 11, 12, PATHS)
    assert (forced.policy, forced.kernel, forced.kernel_why) == ("float32", "cell", "set in params.yaml")
    fixed = autotune.resolve(dataclasses.replace(config, precision="float32"), 11, 12, ("cell", "tf"))
    assert (fixed.policy, fixed.why, fixed.kernel) == ("float32", "set in params.yaml", "tf")
    both = autotune.resolve(dataclasses.replace(config, precision="float32", lstm_kernel="tf"), 11, 12, PATHS)
    assert (both.kernel, both.step_seconds) == ("tf", None)
    # Another shape is another measurement; a GRU has no path to choose and times the precision only.
    timed = []
    monkeypatch.setattr(autotune, "_measure_in_child", lambda shape, variants: timed.append(variants) or
                        {v: 0.1 for v in variants})
    gru = autotune.resolve(dataclasses.replace(config, cell="gru"), 11, 12, ())
    assert timed == [["float32/sequence", "mixed_bfloat16/sequence"]] and "no LSTM path to choose" in gru.kernel_why
    assert len(cache(tmp_path)) == 2


def test_auto_that_cannot_time_bfloat16_chooses_the_path_in_float32_and_says_why(tmp_path, monkeypatch):
    from charrnn import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    asked = []

    def measure(shape, variants):  # as oneDNN held to AVX2: the process dies where bfloat16 is asked for
        asked.append(variants)
        if any(v.startswith("mixed_bfloat16") for v in variants):
            return {"error": "terminate called after throwing an instance of 'dnnl::error'"}
        return {"float32/sequence": 0.3, "float32/cell": 0.2, "float32/tf": 0.4}

    monkeypatch.setattr(autotune, "_measure_in_child", measure)
    config = defaults("train", **TINY, precision="auto", lstm_kernel="auto")
    resolved = autotune.resolve(config, 11, 12, PATHS)
    assert (resolved.policy, resolved.kernel, resolved.speedup) == ("float32", "cell", None)
    assert "could not be timed in bfloat16 (terminate called" in resolved.why and "\n" not in resolved.why
    assert len(asked) == 2 and all(v.startswith("float32/") for v in asked[1])
    # Cached as it came out: the next run makes the same choice without a child.
    monkeypatch.setattr(autotune, "_measure_in_child", lambda *args: pytest.fail("measured again"))
    assert autotune.resolve(config, 11, 12, PATHS) == resolved


def test_auto_that_cannot_time_at_all_trains_on_the_first_path_and_says_why(tmp_path, monkeypatch):
    """A child that fails (a real one): the first path, and the child's last line of error as why."""
    from charrnn import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = defaults("train", **TINY, precision="float32", lstm_kernel="auto")
    shape = autotune.probe_shape
    monkeypatch.setattr(autotune, "probe_shape", lambda *args: {**shape(*args), "cell": "bogus"})  # the child fails
    resolved = autotune.resolve(config, 11, 12, PATHS)
    assert (resolved.policy, resolved.kernel, resolved.speedup) == ("float32", "sequence", None)
    assert resolved.kernel_why.startswith("auto: a train step could not be timed (")
    assert "cell must be one of" in resolved.kernel_why and "\n" not in resolved.kernel_why
    monkeypatch.setattr(autotune, "_measure_in_child", lambda *args: pytest.fail("measured again"))
    assert autotune.resolve(config, 11, 12, PATHS) == resolved


def test_parallel_runs_time_the_train_step_once_per_shape_and_keep_every_entry(tmp_path):
    """Three runs released together by a barrier, two of one shape: two measurements, each under the
    cache's lock (another open of the lock file cannot take it meanwhile), both entries kept."""
    script = textwrap.dedent("""
        import fcntl, os, sys, time
        from pathlib import Path
        from charrnn import autotune
        from tests.conftest import defaults
        def measure(shape, variants):
            with open(sys.argv[2], "a") as log:
                log.write(shape["cell"] + "\\n")
            lock = Path(os.environ["XDG_CACHE_HOME"], "charrnn", "autotune.lock")
            with open(lock, "a") as other:  # a second open file: flock refuses it while the cache is locked
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    sys.exit("measured without holding the cache's lock")
                except BlockingIOError:
                    pass
            return {v: 1.0 if v.startswith("float32") else 0.5 for v in variants}
        autotune._measure_in_child = measure
        config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, cell=sys.argv[1], precision="auto",
                          lstm_kernel="auto")
        barrier = Path(sys.argv[3])
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 3:  # all three ask at once
            time.sleep(0.005)
        print(autotune.resolve(config, 11, 12, ("sequence", "cell") if sys.argv[1] == "lstm" else ()).policy)
    """)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    log, barrier = tmp_path / "measured.txt", tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, cell, str(log), str(barrier)], cwd=REPO, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cell in ("lstm", "lstm", "gru")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.split()[-1] == "mixed_bfloat16", err[-2000:]
    assert sorted(log.read_text().split()) == ["gru", "lstm"]
    assert sorted(key.split("cell=")[1].split(",")[0] for key in cache(tmp_path)) == ["gru", "lstm"]


def test_an_unwritable_cache_folder_trains_with_one_note(capsys, monkeypatch):
    """No lasting cache (a folder that cannot be created): one note saying the timings and the ops
    are made again every run and how to keep them; then the run goes on, measuring for itself."""
    from charrnn import autotune, machine

    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-cache")  # not creatable, even by root
    monkeypatch.setattr(machine, "_cache", {})
    monkeypatch.setattr(autotune, "_measure_in_child", lambda shape, variants: {
        "float32/sequence": 1.0, "mixed_bfloat16/sequence": 2.0})
    config = defaults("train", **TINY, precision="auto", lstm_kernel="sequence")
    for _ in range(2):
        assert autotune.resolve(config, 11, 12, PATHS).policy == "float32"
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "cannot write the cache folder /proc/no-such-cache/charrnn" in notes[0], notes
    assert "made again every run" in notes[0] and "XDG_CACHE_HOME" in notes[0]
    assert machine.cache_dir().is_dir() and os.access(machine.cache_dir(), os.W_OK)


def test_every_path_trains_to_the_same_losses_and_each_repeats_its_bytes():
    """Each path forced on one model: the same losses within float32 round-off over the steps
    (they differ in the last bits, not more), and one path run twice gives the same weights."""
    import keras

    from charrnn import lstm_cpu
    from charrnn.model import build_model
    from charrnn.optimizer import compile_model

    ids = (np.arange(25)[None, :] * 3 + np.arange(8)[:, None]) % 11  # learnable: each row counts by 3

    def train(kernel):
        keras.utils.set_random_seed(4)
        model = build_model(11, embedding_dim=8, rnn_units=32, num_layers=1, dropout=0.0, cell="lstm")
        assert lstm_cpu.install_model(model, kernel=kernel) == 1
        compile_model(model, 0.01, 5.0)
        losses = [float(model.train_on_batch(ids[:, :-1], ids[:, 1:])) for _ in range(8)]
        return losses, model.get_weights()

    if lstm_cpu.available_kernels("lstm", 32) != PATHS:
        missing_prerequisite("the compiled LSTM ops could not be built here (a C++ compiler; see the note on stderr)")
    runs = {kernel: train(kernel) for kernel in PATHS}
    reference = runs["tf"][0]
    assert reference[-1] < reference[0] - 0.3, reference  # it learns (2.40 -> 2.01 measured)
    for kernel in PATHS:
        np.testing.assert_allclose(runs[kernel][0], reference, rtol=5e-7, atol=0)  # measured 1e-7
    again = train("sequence")
    assert again[0] == runs["sequence"][0]
    assert all(np.array_equal(a, b) for a, b in zip(again[1], runs["sequence"][1]))


@pytest.mark.slow  # a train stage, and a real timing in a child
def test_the_train_stage_records_the_path_auto_chose(trained_project, tmp_path):
    """``precision: auto`` and ``lstm_kernel: auto`` through ``dvc repro``, timed for real (six variants in
    one child): the start-of-training line says the path and why, and ``metrics/train.json``, the
    MLflow run's tags and params record the same choice and timings."""
    import mlflow

    project = copy_project(trained_project, tmp_path / "project", upto="sequences", overrides={
        "train": {"precision": "auto", "lstm_kernel": "auto", "epochs": 1, "steps_per_epoch": 4}})
    result = dvc(project, "repro", "train", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert ("train: auto: timing a train step in float32 and mixed_bfloat16 with the LSTM paths sequence, cell, tf"
            in result.stdout)
    (says,) = [line for line in result.stdout.splitlines() if line.startswith("train: precision ")]
    info = json.loads((project / "metrics" / "train.json").read_text())
    assert info["lstm_kernel_path"] in PATHS and {f"float32/{k}" for k in PATHS} <= set(info["step_ms"])
    assert all(ms > 0 for ms in info["step_ms"].values()) and "mixed_bfloat16/cell" in info["step_ms"]
    policy = "float32" if info["precision"] == "float32" else "mixed_bfloat16"
    chosen = info["lstm_kernel_path"]
    others = [k for k in PATHS if k != chosen and f"{policy}/{k}" in info["step_ms"]]
    said = re.fullmatch(rf".*; LSTM: (.+) \(auto: the fastest train step, (\d+) ms \(against "
                        + ", ".join(rf"{k} (\d+) ms" for k in others) + r"\)\)", says)
    assert said and said[1] == info["lstm_kernel"], says
    for printed, path in zip(said.groups()[1:], [chosen, *others]):  # train.json keeps 0.1 ms, the line 1 ms
        assert abs(int(printed) - info["step_ms"][f"{policy}/{path}"]) <= 0.55, (says, info)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert run.data.tags["charrnn.lstm_kernel_path"] == run.data.params["train.lstm_kernel_resolved"] == \
        info["lstm_kernel_path"]
    assert run.data.params["train.lstm_kernel"] == "auto" and "auto: the fastest" in run.data.tags[
        "charrnn.lstm_kernel_reason"]
    assert cache(tmp_path / "cache")  # the timings kept for the next run
