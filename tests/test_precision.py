"""train.precision: auto: timed once per shape, cached under a lock, explained in one clause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from charrnn.precision import AUTO_BFLOAT16_MIN_SPEEDUP
from conftest import REPO, defaults


def test_precision_auto_times_the_train_step_once_and_picks_the_faster(tmp_path, monkeypatch):
    import dataclasses
    import json

    from charrnn import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, num_layers=1, cell="lstm", jit_compile=False, precision="auto")
    assert precision.resolve("float32", config, 11, 12) == ("float32", "set in params.yaml", None)
    policy, why, speedup = precision.resolve("auto", config, 11, 12)  # the train step timed at this shape, then cached
    cache = json.loads((tmp_path / "charrnn" / "precision.json").read_text())
    ((key, entry),) = cache.items()
    assert key.endswith("|vocab_size=11,seq_length=12,batch_size=4,embedding_dim=8,rnn_units=16,num_layers=1,"
                        "cell=lstm,jit_compile=False")
    assert entry["float32_s"] > 0 and entry["mixed_bfloat16_s"] > 0
    faster = entry["float32_s"] / entry["mixed_bfloat16_s"] >= AUTO_BFLOAT16_MIN_SPEEDUP
    assert policy == ("mixed_bfloat16" if faster else "float32") and "train step" in why and "measured once" in why
    assert speedup == round(entry["float32_s"] / entry["mixed_bfloat16_s"], 3)  # recorded with the run
    # The cached verdict decides from then on (here: bf16 made 2x faster, then 2x slower).
    for bf16_s, expected in ((entry["float32_s"] / 2, "mixed_bfloat16"), (entry["float32_s"] * 2, "float32")):
        cache[key]["mixed_bfloat16_s"] = bf16_s
        (tmp_path / "charrnn" / "precision.json").write_text(json.dumps(cache))
        assert precision.resolve("auto", config, 11, 12)[0] == expected
    # Another shape is another measurement.
    precision.resolve("auto", dataclasses.replace(config, cell="gru"), 11, 12)
    assert len(json.loads((tmp_path / "charrnn" / "precision.json").read_text())) == 2


def test_precision_auto_that_cannot_time_bfloat16_trains_float32_and_says_why(tmp_path, monkeypatch):
    from charrnn import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, num_layers=1, cell="lstm", jit_compile=False, precision="auto")
    shape = precision.probe_shape
    monkeypatch.setattr(precision, "probe_shape", lambda *args: {**shape(*args), "cell": "bogus"})  # the child fails
    policy, why, speedup = precision.resolve("auto", config, 11, 12)
    assert policy == "float32" and speedup is None
    assert "could not be timed" in why and "cell must be one of" in why and "\n" not in why
    # The failure is cached like a verdict: the next run makes the same choice without a child.
    monkeypatch.setattr(precision, "_measure_in_child", lambda shape: pytest.fail("measured again"))
    assert precision.resolve("auto", config, 11, 12) == (policy, why, None)


def test_parallel_runs_time_the_precision_probe_once_per_shape_and_keep_every_verdict(tmp_path):
    """Three runs released together by a barrier, two of one shape: two measurements, each under the
    cache's lock (another open of the lock file cannot take it meanwhile), both verdicts kept."""
    script = textwrap.dedent("""
        import fcntl, os, sys, time
        from pathlib import Path
        from charrnn import precision
        from tests.conftest import defaults
        def measure(shape):
            with open(sys.argv[2], "a") as log:
                log.write(shape["cell"] + "\\n")
            lock = Path(os.environ["XDG_CACHE_HOME"], "charrnn", "precision.lock")
            with open(lock, "a") as other:  # a second open file: flock refuses it while the cache is locked
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    sys.exit("measured without holding the precision cache's lock")
                except BlockingIOError:
                    pass
            return {"float32_s": 1.0, "mixed_bfloat16_s": 0.5}
        precision._measure_in_child = measure
        config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, cell=sys.argv[1], precision="auto")
        barrier = Path(sys.argv[3])
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 3:  # all three ask at once
            time.sleep(0.005)
        print(precision.resolve("auto", config, 11, 12).policy)
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
    cache = json.loads((tmp_path / "charrnn" / "precision.json").read_text())
    assert sorted(key.split("cell=")[1].split(",")[0] for key in cache) == ["gru", "lstm"]


def test_an_unwritable_cache_folder_trains_with_one_note(capsys, monkeypatch):
    """No lasting cache (a folder that cannot be created): one note saying the verdict and the ops are
    made again every run and how to keep them; then the run goes on, measuring for itself."""
    from charrnn import machine, precision

    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-cache")  # not creatable, even by root
    monkeypatch.setattr(machine, "_cache", {})
    monkeypatch.setattr(precision, "_measure_in_child", lambda shape: {"float32_s": 1.0, "mixed_bfloat16_s": 2.0})
    config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, precision="auto")
    for _ in range(2):
        assert precision.resolve("auto", config, 11, 12).policy == "float32"
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "cannot write the cache folder /proc/no-such-cache/charrnn" in notes[0], notes
    assert "made again every run" in notes[0] and "XDG_CACHE_HOME" in notes[0]
    assert machine.cache_dir().is_dir() and os.access(machine.cache_dir(), os.W_OK)
