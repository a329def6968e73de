"""``train.precision: auto``: bfloat16 where this kind of processor trains it faster, float32 elsewhere.

The CPU flag does not tell: one AVX512-BF16 Xeon multiplies bf16 at half its fp32 rate, an AVX512-BF16
EPYC at twice it, a Xeon with AMX at five times it; and a matmul rate does not tell either, because at
the small widths CPU runs use, the per-step overhead of the recurrence weighs as much as the
multiplications. So ``auto`` measures what it decides about: the run's own train step (the model of
``params.yaml``, the fast CPU LSTM, the optimizer, at the run's batch and sequence length, with XLA if
``train.jit_compile``) in float32 and in mixed_bfloat16, and picks bfloat16 only when it is clearly
faster (``AUTO_BFLOAT16_MIN_SPEEDUP``). It measures in a child process, so that nothing of the probe (traced
functions, random state, thread pools) touches the training process: a run that measured and a run
that read the cached verdict train the same bytes. The verdict is cached per kind of machine, shape
and version of the fused LSTM's code (``~/.cache/charrnn/precision.json``), so every run there makes
the same choice; it is printed and logged to MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from charrnn import cell_ops, files, machine

# The code that decides the probe's speed beyond what the key names already (the shape, the processor,
# TensorFlow's version): the compiled kernels and the Python that picks and drives them in each
# precision. An edit to either times the step again. Not cell_ops.py (its compiler flags take effect
# only with a new build, which the .cc's edit makes) nor model.py (its other layers are Keras',
# versioned with TensorFlow; it changes for saving and loading): an edit there would re-time for nothing.
SPEED_SOURCES = (cell_ops.SOURCE, *(Path(__file__).with_name(name) for name in ("lstm_cpu.py", "lstm_fused.py")))
POLICIES = ("float32", "mixed_bfloat16")
ROUNDS = 3           # timed rounds per policy, interleaved float32 / bfloat16
STEPS_PER_ROUND = 2  # train steps per timed round
PROBE_TIMEOUT_S = 900  # the child that times the train steps; a hung probe must not hang the training

# auto trains in bfloat16 only when its measured train step is at least this many times faster than
# float32's (below it, the speed-up does not pay for bfloat16's rounding).
AUTO_BFLOAT16_MIN_SPEEDUP = 1.15


def cache_file() -> Path:
    return machine.cache_dir() / "precision.json"


def speed_sources_digest() -> str:
    """A digest of ``SPEED_SOURCES``: verdicts are kept per version of the code they timed."""
    return files.sha256_files(SPEED_SOURCES)[:16]


def probe_shape(config, vocab_size: int, seq_length: int) -> dict:
    """What the train step's speed depends on: the model, the batch, XLA."""
    return {"vocab_size": vocab_size, "seq_length": seq_length, "batch_size": config.batch_size,
            "embedding_dim": config.embedding_dim, "rnn_units": config.rnn_units,
            "num_layers": config.num_layers, "cell": config.cell, "jit_compile": bool(config.jit_compile)}


def time_train_steps(shape: dict) -> dict:
    """Median seconds of one train step per policy at ``shape``, in this process.

    Each policy's model is built and warmed up (the first steps trace), then the policies are
    timed in turn, ``ROUNDS`` rounds of ``STEPS_PER_ROUND`` steps, so drift on a noisy machine
    hits both alike.
    """
    import numpy as np

    from charrnn import lstm_cpu
    from charrnn.model import build_model, compile_model

    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape["vocab_size"], (shape["batch_size"], shape["seq_length"] + 1)).astype("int32")
    x, y = ids[:, :-1], ids[:, 1:]
    models = {}
    for policy in POLICIES:
        model = build_model(shape["vocab_size"], embedding_dim=shape["embedding_dim"], rnn_units=shape["rnn_units"],
                            num_layers=shape["num_layers"], dropout=0.0, cell=shape["cell"], precision=policy)
        lstm_cpu.install_model(model)
        compile_model(model, 1e-3, 5.0, jit_compile=shape["jit_compile"])
        for _ in range(2):
            model.train_on_batch(x, y)
        models[policy] = model
    times: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for _ in range(ROUNDS):
        for policy, model in models.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                model.train_on_batch(x, y)
            times[policy].append((time.perf_counter() - start) / STEPS_PER_ROUND)
    return {f"{policy}_s": sorted(t)[len(t) // 2] for policy, t in times.items()}


def _measure_in_child(shape: dict) -> dict:
    """The child's timings, or ``{"error": ...}`` when it failed (oneDNN aborts the process on a
    machine where it cannot build a bfloat16 matmul, so the probe cannot run in this process). The
    child inherits ``CHARRNN_THREADS``, so it times the steps with the threads the run will use."""
    try:
        result = subprocess.run([sys.executable, "-m", "charrnn.precision", json.dumps(shape)],
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"the timing did not finish in {PROBE_TIMEOUT_S} s"}
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return {"error": detail[:300]}


def _complete(entry) -> bool:
    return isinstance(entry, dict) and ("error" in entry or all(f"{p}_s" in entry for p in POLICIES))


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _verdict(key: str, shape: dict, path: Path) -> tuple[dict, str]:
    """The cached entry for ``key``, else measured and merged into the cache under a lock (so that
    parallel runs measure once and lose none of each other's entries); and where it is kept."""
    try:
        with machine.locked(path.with_name("precision.lock")):
            cache = _read(path)  # no other process writes it while the lock is held
            entry = cache.get(key)
            if _complete(entry):
                return entry, f"measured once, cached in {path}"
            print("train.precision: auto: timing a train step in float32 and in bfloat16 (once per machine "
                  "and shape)", flush=True)
            entry = _measure_in_child(shape)
            files.write_json(path, {**cache, key: entry})
            return entry, f"measured once, cached in {path}"
    except OSError as error:
        reason = " ".join(str(error).split())
    # An unwritable cache: measure for this run, and say that the next run measures again.
    print(f"train.precision: auto: cannot cache the verdict in {path} ({reason}): timing a train step "
          "now, and again every run; set XDG_CACHE_HOME to a writable folder to keep it", flush=True)
    entry = _measure_in_child(shape)
    return entry, "measured for this run only: the cache is not writable"


class Resolved(NamedTuple):
    policy: str                  # what trains: float32, mixed_bfloat16, ...
    why: str                     # one clause, printed at the start of training and logged
    speedup: float | None = None  # bfloat16's measured speed over float32's, when auto measured it


def resolve(requested: str, config, vocab_size: int, seq_length: int) -> Resolved:
    """The policy to train in: ``requested`` itself unless it is ``auto``; ``config`` is the TrainConfig."""
    if requested != "auto":
        return Resolved(requested, "set in params.yaml")
    kind = machine.machine_kind()
    shape = probe_shape(config, vocab_size, seq_length)
    key = f"{kind}|lstm_cpu-{speed_sources_digest()}|" + ",".join(f"{name}={value}" for name, value in shape.items())
    entry, kept = _verdict(key, shape, cache_file())
    if "error" in entry:
        return Resolved("float32", f"auto: a train step could not be timed in both precisions on this machine "
                                    f"({entry['error']}); {kept}")
    speedup = entry["float32_s"] / entry["mixed_bfloat16_s"]
    policy = "mixed_bfloat16" if speedup >= AUTO_BFLOAT16_MIN_SPEEDUP else "float32"
    why = f"auto: a train step in bfloat16 ran {speedup:.2f}x float32's speed on this machine ({kind.split(':tf')[0]}; {kept})"
    return Resolved(policy, why, round(speedup, 3))


if __name__ == "__main__":  # the child of _measure_in_child (its stderr is shown only on failure)
    from charrnn.threads import configure_threads

    configure_threads()
    print(json.dumps(time_train_steps(json.loads(sys.argv[1]))), flush=True)
