"""Training throughput of Keras' stock LSTM vs the fused CPU LSTM (charrnn.lstm_cpu), and PyTorch.

    python benchmarks/lstm_cpu.py [--configs seed small] [--units 384] [--repeats 5]
                                  [--bf16] [--no-torch]

One training step (Embedding -> LSTM -> Dense logits, Adam, sparse cross-entropy from logits,
the pipeline's build_model/compile_model) is timed at a time, the variants interleaved within
each repeat so that a noisy neighbour hits all of them alike; the figure is the median step.
Every variant is warmed up with the same two steps first. Keras runs its compiled train step
(``train_on_batch``); PyTorch (only if ``torch`` is importable: ``pip install torch==2.13.0``) a
plain ``nn.LSTM`` of the same shape, fp32, Adam, measured in the same run but in a child process
started right after the Keras repeats: in one process, TensorFlow's and PyTorch's spinning
thread pools fight over the 2 cores (PyTorch ran at a third of its speed there).

Configs: ``seed`` = Embedding(65, 256) -> LSTM(1024), batch 64 x 100; ``small`` = Embedding 64
-> LSTM ``--units`` (384), batch 32 x 100. ``--bf16`` adds the fused LSTM with only its per-step
recurrent matmuls in bfloat16 (an experiment: not what the pipeline trains with).
Prints one JSON object. About a minute per config on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "--torch-child" not in sys.argv:  # the PyTorch child process imports no TensorFlow
    import keras
    import numpy as np
    import tensorflow as tf

    from charrnn import lstm_cpu
    from charrnn.model import build_model, compile_model

VOCAB, SEQ = 65, 100
CONFIGS = {"seed": (256, 1024, 64), "small": (64, 384, 32)}


def cpu_flags() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    return {"model": info.get("Model name", "").strip(), "cores": os.cpu_count(),
            "flags": {f: f in flags for f in wanted}}


def matmul_gflops(dtype, repeats: int = 5) -> float:
    a = tf.cast(tf.random.normal([512, 1280]), dtype)
    b = tf.cast(tf.random.normal([1280, 4096]), dtype)
    f = tf.function(lambda: tf.matmul(a, b))
    f()
    rates = []
    for _ in range(repeats):
        n, start = 10, time.perf_counter()
        for _ in range(n):
            f().numpy()
        rates.append(2 * 512 * 1280 * 4096 * n / (time.perf_counter() - start) / 1e9)
    return round(statistics.median(rates), 1)


def keras_step(embedding: int, units: int, batch: int, variant: str):
    keras.utils.set_random_seed(0)
    model = build_model(VOCAB, embedding, units)
    if variant == "keras_fused":
        assert lstm_cpu.install_model(model) == 1
    elif variant == "keras_fused_bf16_matmul":
        assert lstm_cpu.install_model(model, matmul_dtype=tf.bfloat16) == 1
    compile_model(model, 1e-3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (batch, SEQ), dtype=np.int32)
    x, y = tf.constant(x), tf.constant(np.roll(x, -1, axis=1))
    return lambda: model.train_on_batch(x, y)


def torch_step(embedding: int, units: int, batch: int):
    import torch

    torch.manual_seed(0)

    class CharRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(VOCAB, embedding)
            self.lstm = torch.nn.LSTM(embedding, units, batch_first=True)
            self.logits = torch.nn.Linear(units, VOCAB)

        def forward(self, ids):
            return self.logits(self.lstm(self.embedding(ids))[0])

    model = CharRNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randint(0, VOCAB, (batch, SEQ))
    y = torch.roll(x, -1, dims=1)

    def step():
        optimizer.zero_grad()
        loss = loss_fn(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_steps(variants: dict, repeats: int) -> dict:
    for step in variants.values():  # trace and warm up, alike
        step()
        step()
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def torch_available() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def measure(config: str, units: int | None, repeats: int, bf16: bool, with_torch: bool) -> dict:
    embedding, default_units, batch = CONFIGS[config]
    units = units or default_units
    variants = {v: keras_step(embedding, units, batch, v) for v in (
        ["keras_stock", "keras_fused"] + (["keras_fused_bf16_matmul"] if bf16 else []))}
    times = time_steps(variants, repeats)
    if with_torch:
        proc = subprocess.run(
            [sys.executable, __file__, "--torch-child", str(embedding), str(units), str(batch),
             str(repeats)], capture_output=True, text=True, check=True)
        times["torch_nn_lstm"] = json.loads(proc.stdout.splitlines()[-1])
    tokens = batch * SEQ
    rate = {v: round(tokens / statistics.median(t)) for v, t in times.items()}
    result = {"embedding": embedding, "units": units, "batch": batch, "seq": SEQ,
              "repeats": repeats, "tokens_per_s": rate,
              "step_s_all": {v: [round(s, 4) for s in t] for v, t in times.items()},
              "fused_over_stock": round(rate["keras_fused"] / rate["keras_stock"], 2)}
    if "torch_nn_lstm" in rate:
        result["fused_over_torch"] = round(rate["keras_fused"] / rate["torch_nn_lstm"], 2)
    return result


def main() -> None:
    if sys.argv[1:2] == ["--torch-child"]:
        embedding, units, batch, repeats = map(int, sys.argv[2:6])
        times = time_steps({"torch": torch_step(embedding, units, batch)}, repeats)["torch"]
        print(json.dumps(times))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["seed", "small"])
    parser.add_argument("--units", type=int, default=None, help="LSTM units of the small config")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="add the bf16-matmul fused variant")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    torch_version = None if args.no_torch else torch_available()
    report = {
        "cpu": cpu_flags(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "torch": torch_version,
        "matmul_gflops": {"float32": matmul_gflops(tf.float32),
                          "bfloat16": matmul_gflops(tf.bfloat16)},
        "configs": {},
    }
    for config in args.configs:
        units = args.units if config == "small" else None
        name = config if units is None else f"{config}_{units}"
        report["configs"][name] = measure(config, units, args.repeats, args.bf16,
                                          torch_version is not None)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
