"""Training throughput of the seed config per precision policy, against this CPU's matmul speed.

    python benchmarks/train_throughput.py [--steps 6] [--repeats 3] [--policies float32 mixed_bfloat16 float32+xla]

The pipeline trains with TensorFlow op determinism on (train.deterministic); that switch is
process-wide and cannot be undone, so the fp32 figure with it on is measured in a child process
of this run (--op-determinism) and reported beside the figure without it.

Seed config: embedding 256, LSTM 1024, vocabulary 65, batch 64, sequences of 100, Adam, the
pipeline's own `build_model`/`compile_model` and `model.fit` on an in-memory tf.data pipeline.
The baseline, measured in the same run, is a plain fp32 matmul of the LSTM's gate shape
((batch x (256+1024)) @ (1280 x 4096)); each policy's figure is also given as a fraction of the
model FLOP rate that matmul speed allows (~3 x 10.5 MFLOP per token for forward + backward).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from charrnn.model import build_model, compile_model

BATCH, SEQ, VOCAB = 64, 100, 65
FLOP_PER_TOKEN = 3 * 2 * (256 + 1024) * 4 * 1024  # forward + backward of the gate matmuls


def matmul_gflops(repeats: int) -> float:
    a = tf.random.normal([BATCH * 8, 1280])
    b = tf.random.normal([1280, 4096])
    f = tf.function(lambda: tf.matmul(a, b))
    f()
    rates = []
    for _ in range(repeats):
        n, start = 20, time.perf_counter()
        for _ in range(n):
            f().numpy()
        rates.append(2 * a.shape[0] * 1280 * 4096 * n / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def tokens_per_s(variant: str, steps: int) -> float:
    """``variant``: a precision policy, optionally with ``+xla`` (the train step compiled by XLA)."""
    policy, _, xla = variant.partition("+")
    keras.utils.set_random_seed(0)
    model = build_model(VOCAB, 256, 1024, precision=policy)
    compile_model(model, 1e-3, jit_compile=xla == "xla")
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)
    ds = tf.data.Dataset.from_tensors((x, np.roll(x, -1, axis=1))).repeat()
    model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * BATCH * SEQ / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16", "float32+xla"],
                        help="precision policies; POLICY+xla compiles the train step with XLA (train.jit_compile)")
    parser.add_argument("--default-policy", default="float32", help="the pipeline's default (params.yaml)")
    parser.add_argument("--op-determinism", action="store_true", help="(child) measure with op determinism on")
    args = parser.parse_args()
    if args.op_determinism:
        tf.config.experimental.enable_op_determinism()
        rates = [tokens_per_s("float32", args.steps) for _ in range(args.repeats)]
        print(json.dumps({"tokens_per_s_fp32_deterministic": statistics.median(rates), "runs": rates}))
        return
    gflops = matmul_gflops(args.repeats)
    ceiling = gflops * 1e9 / FLOP_PER_TOKEN
    results = {p: [] for p in args.policies}
    for _ in range(args.repeats):
        for policy in args.policies:
            results[policy].append(tokens_per_s(policy, args.steps))
    medians = {p: statistics.median(v) for p, v in results.items()}
    child = subprocess.run([sys.executable, __file__, "--op-determinism", "--steps", str(args.steps),
                            "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
    deterministic = json.loads(child.stdout.strip().splitlines()[-1])["tokens_per_s_fp32_deterministic"]
    print(f"fp32 matmul: {gflops:.1f} GFLOP/s -> model ceiling {ceiling:,.0f} tokens/s at that rate")
    print(f"{'policy':<16} {'tokens/s':>10} {'of ceiling':>11}   runs")
    for policy, value in medians.items():
        runs = ", ".join(f"{v:.0f}" for v in results[policy])
        print(f"{policy:<16} {value:>10,.0f} {value / ceiling:>10.0%}   [{runs}]")
    print(f"{'float32 + op determinism':<16} {deterministic:>10,.0f} {deterministic / ceiling:>10.0%}   "
          f"(child process; {deterministic / medians['float32']:.2f}x of float32 without it)")
    summary = {
        # What the pipeline runs by default: float32 with op determinism on.
        "tokens_per_s": round(deterministic if args.default_policy == "float32" else medians[args.default_policy], 1),
        "tokens_per_s_fp32": round(medians.get("float32", float("nan")), 1),
        "matmul_gflops": round(gflops, 1),
        "fp32_fraction_of_matmul": round(medians.get("float32", float("nan")) / ceiling, 3),
        **{f"tokens_per_s_{p.replace('+', '_')}": round(v, 1) for p, v in medians.items()},
        "tokens_per_s_fp32_op_determinism": round(deterministic, 1),
        "op_determinism_ratio": round(deterministic / medians["float32"], 3),
        "default_policy": args.default_policy,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
