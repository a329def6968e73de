"""``auto`` in params.yaml, resolved by timing the run's own train step on this machine: the precision
(``train.precision``) and the path that computes the LSTM (``train.lstm_kernel``).

Neither the CPU flags nor a matmul rate tell what trains fastest. One AVX512-BF16 Xeon multiplies
bf16 at half its fp32 rate, an AVX512-BF16 EPYC at twice it, a Xeon with AMX at five times it; and at
the small widths CPU runs use, the per-step work around the recurrence weighs as much as the
multiplications. Which LSTM path wins depends on the shape and the cores too: the whole recurrence in
one compiled op per direction (``sequence``), one compiled op per timestep around TensorFlow's matmul
(``cell``), or TensorFlow's ops only (``tf``). So ``auto`` measures what it decides about: the run's own
train step (the model of ``params.yaml``, the optimizer, the run's batch and sequence length, XLA if
``train.jit_compile``) in every candidate precision and path, and picks:

* the precision: mixed_bfloat16 only when its fastest path is at least ``AUTO_BFLOAT16_MIN_SPEEDUP``
  times float32's fastest (below that the speed-up does not pay for bfloat16's rounding);
* the path: the fastest in that precision; within ``KERNEL_TIE`` of it the one first in ``KERNELS``.

It measures in a child process, so that nothing of the probe (traced functions, random state, thread
pools) touches the training process: a run that measured and a run that read the cached verdict train
the same bytes. Timings are cached per kind of machine, shape and version of the LSTM code
(``~/.cache/charrnn/autotune.json``), so every run there makes the same choice; it is printed at the start
of training, logged to MLflow and written to ``metrics/train.json``.
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
KERNELS = ("sequence", "cell", "tf")  # what lstm_cpu installs; on a tie, the first wins
ROUNDS = 3           # timed rounds per variant, the variants interleaved
STEPS_PER_ROUND = 2  # train steps per timed round
PROBE_TIMEOUT_S = 900  # the child that times the train steps; a hung probe must not hang the training

# auto trains in bfloat16 only when its measured train step is at least this many times faster than
# float32's (below it, the speed-up does not pay for bfloat16's rounding).
AUTO_BFLOAT16_MIN_SPEEDUP = 1.15
# A path later in KERNELS is chosen only when it is more than this many times faster: paths that time
# alike (noise) keep the first, so machines of one kind do not flip between them.
KERNEL_TIE = 1.03


def cache_file() -> Path:
    return machine.cache_dir() / "autotune.json"


def speed_sources_digest() -> str:
    """A digest of ``SPEED_SOURCES``: timings are kept per version of the code they timed."""
    return files.sha256_files(SPEED_SOURCES)[:16]


def probe_shape(config, vocab_size: int, seq_length: int) -> dict:
    """What the train step's speed depends on: the model, the batch, XLA, the weight drop's mask."""
    return {"vocab_size": vocab_size, "seq_length": seq_length, "batch_size": config.batch_size,
            "embedding_dim": config.embedding_dim, "rnn_units": config.rnn_units,
            "num_layers": config.num_layers, "cell": config.cell, "jit_compile": bool(config.jit_compile),
            **({"weight_drop": config.weight_drop} if config.weight_drop else {})}


def variant(policy: str, kernel: str) -> str:
    return f"{policy}/{kernel}"


def time_train_steps(shape: dict, variants: list[str]) -> dict:
    """Median seconds of one train step per variant (``policy/kernel``) at ``shape``, in this process,
    for those of ``variants`` this machine can run (a kernel path it lacks is left out: see
    :func:`charrnn.lstm_cpu.available_kernels`).

    Each variant's model is built and warmed up (the first steps trace), then the variants are
    timed in turn, ``ROUNDS`` rounds of ``STEPS_PER_ROUND`` steps, so drift on a noisy machine
    hits all alike.
    """
    import numpy as np

    from charrnn import lstm_cpu
    from charrnn.model import build_model
    from charrnn.optimizer import compile_model

    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape["vocab_size"], (shape["batch_size"], shape["seq_length"] + 1)).astype("int32")
    x, y = ids[:, :-1], ids[:, 1:]
    models = {}
    for name in variants:
        policy, kernel = name.split("/")
        available = lstm_cpu.available_kernels(shape["cell"], shape["rnn_units"], policy == "mixed_bfloat16",
                                               shape["jit_compile"])
        if available and kernel not in available:  # none available: a GRU or a GPU, timed as it runs
            continue
        model = build_model(shape["vocab_size"], embedding_dim=shape["embedding_dim"], rnn_units=shape["rnn_units"],
                            num_layers=shape["num_layers"], dropout=0.0, cell=shape["cell"], precision=policy)
        lstm_cpu.install_model(model, kernel=kernel, weight_drop=shape.get("weight_drop", 0.0))
        compile_model(model, 1e-3, 5.0, jit_compile=shape["jit_compile"])
        for _ in range(2):
            model.train_on_batch(x, y)
        models[name] = model
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                model.train_on_batch(x, y)
            times[name].append((time.perf_counter() - start) / STEPS_PER_ROUND)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _measure_in_child(shape: dict, variants: list[str]) -> dict:
    """The child's timings (``{variant: seconds}``), or ``{"error": ...}`` when it failed (oneDNN
    aborts the process on a machine where it cannot build a bfloat16 matmul, so the probe cannot run
    in this process). The child inherits ``CHARRNN_THREADS``, so it times the steps with the threads
    the run will use."""
    try:
        result = subprocess.run([sys.executable, "-m", "charrnn.autotune", json.dumps(shape), ",".join(variants)],
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"the timing did not finish in {PROBE_TIMEOUT_S} s"}
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return {"error": " ".join(detail.split())[:300]}


def _measure(shape: dict, policies: tuple, kernels: tuple) -> dict:
    """Timings of every policy x kernel; where the child fails with bfloat16 among the policies,
    float32's alone, and the failure under ``mixed_bfloat16/error``."""
    entry = _measure_in_child(shape, [variant(p, k) for p in policies for k in kernels])
    if "error" in entry and len(policies) > 1:
        failed = entry["error"]
        entry = _measure_in_child(shape, [variant("float32", k) for k in kernels])
        if "error" not in entry:
            entry["mixed_bfloat16/error"] = failed
    return entry


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _answers(entry: dict, policies: tuple, kernels: tuple) -> bool:
    """Whether ``entry`` holds what choosing among ``policies`` x ``kernels`` needs: a timing (or a
    recorded absence) of each, or the failure of the whole timing."""
    if "error" in entry:
        return True
    timed = entry.get("timed", [])
    return all(variant(p, k) in timed or f"{p}/error" in entry for p in policies for k in kernels)


def _timings(key: str, shape: dict, policies: tuple, kernels: tuple, path: Path) -> tuple[dict, str]:
    """The cached timings for ``key`` where they answer this choice, else measured (all of this
    choice's variants in one child, so they are compared under the same conditions) and merged into
    the cache under a lock (parallel runs measure once and lose none of each other's entries); and
    where they are kept."""
    try:
        with machine.locked(path.with_name("autotune.lock")):
            cache = _read(path)  # no other process writes it while the lock is held
            entry = cache.get(key, {})
            if not _answers(entry, policies, kernels):
                print(f"train: auto: timing a train step in {' and '.join(policies)} with the LSTM paths "
                      f"{', '.join(kernels)} (once per machine and shape)", flush=True)
                measured = _measure(shape, policies, kernels)
                asked = [variant(p, k) for p in policies for k in kernels]
                entry = measured if "error" in measured else {
                    **{k: v for k, v in entry.items() if k != "error"}, **measured,
                    "timed": sorted(set(entry.get("timed", [])) | set(asked))}
                files.write_json(path, {**cache, key: entry})
            return entry, f"measured once, cached in {path}"
    except OSError as error:
        reason = " ".join(str(error).split())
    # An unwritable cache: measure for this run, and say that the next run measures again.
    print(f"train: auto: cannot cache the timings in {path} ({reason}): timing a train step now, and "
          "again every run; set XDG_CACHE_HOME to a writable folder to keep them", flush=True)
    measured = _measure(shape, policies, kernels)
    if "error" not in measured:
        measured["timed"] = [variant(p, k) for p in policies for k in kernels]
    return measured, "measured for this run only: the cache is not writable"


class Resolved(NamedTuple):
    policy: str                  # what trains: float32, mixed_bfloat16, ...
    why: str                     # one clause, printed at the start of training and logged
    speedup: float | None = None  # bfloat16's measured speed over float32's, when auto measured it
    kernel: str = "sequence"     # the LSTM path: sequence | cell | tf (lstm_cpu.KERNELS)
    kernel_why: str = "set in params.yaml"
    step_seconds: dict | None = None  # the timings the choice was made on, {"float32/sequence": s, ...}


def _fastest(timings: dict, policy: str, kernels: tuple) -> tuple[str, float] | None:
    """The fastest of ``kernels`` in ``policy`` (ties within KERNEL_TIE to the first), and its time."""
    timed = [(k, timings[variant(policy, k)]) for k in kernels if variant(policy, k) in timings]
    if not timed:
        return None
    best = min(seconds for _, seconds in timed)
    return next((k, s) for k, s in timed if s <= best * KERNEL_TIE)


def resolve(config, vocab_size: int, seq_length: int, kernels: tuple = KERNELS) -> Resolved:
    """The precision and LSTM path to train with: ``config.precision`` and ``config.lstm_kernel``
    themselves unless ``auto`` (``config`` is the TrainConfig). ``kernels``: the paths this model
    can run here (:func:`charrnn.lstm_cpu.available_kernels`); with one, nothing is timed for it,
    with none (a GRU, a GPU) the LSTM path is not chosen (``kernel`` keeps its default)."""
    policies = POLICIES if config.precision == "auto" else (config.precision,)
    kernel_auto = config.lstm_kernel == "auto"
    no_choice = kernel_auto and not kernels  # the model runs what it runs; only the precision is timed
    candidates = (KERNELS[0],) if no_choice else tuple(kernels) if kernel_auto else (config.lstm_kernel,)
    if not kernel_auto:
        kernel_why = "set in params.yaml"
    elif no_choice:
        kernel_why = "auto: no LSTM path to choose for this model here (cuDNN on a GPU, Keras' own GRU)"
    else:
        kernel_why = "auto: the only path for this model here"
    if len(policies) == 1 and len(candidates) == 1:
        return Resolved(policies[0], "set in params.yaml", kernel=candidates[0], kernel_why=kernel_why)
    kind = machine.machine_kind()
    shape = probe_shape(config, vocab_size, seq_length)
    key = f"{kind}|lstm-{speed_sources_digest()}|" + ",".join(f"{name}={value}" for name, value in shape.items())
    entry, kept = _timings(key, shape, policies, candidates, cache_file())
    timings = {name: entry[name] for p in policies for k in candidates if (name := variant(p, k)) in entry}
    where = f"on this machine ({kind.split(':tf')[0]}; {kept})"
    if "error" in entry or _fastest(timings, policies[0], candidates) is None:  # float32 first under auto
        # Nothing could be timed: float32 (or the precision asked for) on the first path asked for.
        what = "a train step could not be timed" + (f" ({entry['error']})" if "error" in entry else "")
        policy = policies[0]
        return Resolved(policy, f"auto: {what} {where}" if config.precision == "auto" else "set in params.yaml",
                        kernel=candidates[0], kernel_why=f"auto: {what}" if len(candidates) > 1 else kernel_why)
    policy, why, speedup = policies[0], "set in params.yaml", None
    if config.precision == "auto":
        float32 = _fastest(timings, "float32", candidates)
        bfloat16 = _fastest(timings, "mixed_bfloat16", candidates)
        if bfloat16 is None:
            why = (f"auto: a train step could not be timed in bfloat16 ({entry.get('mixed_bfloat16/error', '?')}) "
                   f"{where}")
        else:
            speedup = round(float32[1] / bfloat16[1], 3)
            policy = "mixed_bfloat16" if speedup >= AUTO_BFLOAT16_MIN_SPEEDUP else "float32"
            why = f"auto: a train step in bfloat16 ran {speedup:.2f}x float32's speed {where}"
    kernel, seconds = _fastest(timings, policy, candidates)
    if len(candidates) > 1:
        others = ", ".join(f"{k} {timings[variant(policy, k)] * 1e3:.0f} ms" for k in candidates
                           if k != kernel and variant(policy, k) in timings)
        kernel_why = f"auto: the fastest train step, {seconds * 1e3:.0f} ms" + (f" (against {others})" if others else "")
    return Resolved(policy, why, speedup, kernel, kernel_why, timings)


if __name__ == "__main__":  # the child of _measure_in_child (its stderr is shown only on failure)
    from charrnn.threads import configure_threads

    configure_threads()
    print(json.dumps(time_train_steps(json.loads(sys.argv[1]), sys.argv[2].split(","))), flush=True)
