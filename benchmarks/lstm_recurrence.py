"""The LSTM recurrence alone, forward and backward, per kernel: where the compiled ops' time goes.

    python benchmarks/lstm_recurrence.py [--configs seed,default,cpu] [--repeats 5] [--matmul-dtype float32|bfloat16]
                                         [--variants sequence_forward_op,sequence_backward_op,tf_matmul_loop]

Prints one JSON object. For each config's shape (``train_throughput.py``'s: seed = batch 64, LSTM
1024, input 256, 100 timesteps; default = params.yaml's (batch 16, LSTM 512, input 64, 200
timesteps); cpu = batch 32, LSTM 384, input 64, 100 timesteps), milliseconds per call of:

* ``fused_lstm`` forward + backward (a tf.function: values and all six gradients) with TensorFlow's
  ops only (``tfops``), the per-step compiled cell ops (``cell``) and the whole-sequence ops
  (``sequence``): the kernel's share of a train step, without the embedding, Dense layer and
  optimizer;
* the whole-sequence ops' forward and backward op alone (``sequence_forward_op``,
  ``sequence_backward_op``);
* the floor they are compared with: TensorFlow's own matmul of the recurrence's shape, one per timestep
  in one graph loop (``tf_matmul_loop``, [batch, units] @ [units, 4 units]), i.e. what the recurrent
  matmuls of one direction cost in oneDNN with no gate arithmetic at all;
* two of the float32 pieces the gradient runs around the ops: the recurrent kernel's gradient, one
  matmul over all timesteps (``recurrent_weight_gradient``, [units, T*batch] @ [T*batch, 4 units]),
  and the bias gradient as fused_lstm sums it (``bias_gradient``: over the batch, then over time)
  and in one ``reduce_sum`` over all T*batch rows (``bias_gradient_one_reduce``, as it did before).

Every variant is traced and warmed up alike (two calls), then the repeats run the variants in
turn (interleaved, so a noisy neighbour hits all); each figure is the median. ``--variants`` times
only those named (the ops alone, say, without the whole train-step-sized graphs between them). ``--matmul-dtype
bfloat16`` times the bfloat16-matmul kernels (the sequence ops need a build for AVX512-BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from charrnn.prologue import BFC_ALLOCATOR  # noqa: E402

os.environ.setdefault(*BFC_ALLOCATOR)  # TensorFlow's allocator as the stages set it
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import CONFIGS, csv_list, machine_info  # noqa: E402


def variants(embedding: int, units: int, batch: int, seq: int, mm_dtype) -> dict:
    """name -> a zero-argument callable that runs one call to completion."""
    import numpy as np
    import tensorflow as tf

    from charrnn import cell_ops, lstm_fused

    rng = np.random.default_rng(0)
    args = [tf.constant(rng.normal(0, s, shape).astype(np.float32)) for s, shape in (
        (1, (batch, seq, embedding)), (0.5, (batch, units)), (0.5, (batch, units)),
        (0.1, (embedding, 4 * units)), (0.05, (units, 4 * units)), (0.1, (4 * units,)))]
    out = {}
    for name, compiled in (("tfops", False), ("cell", "cell"), ("sequence", "sequence")):
        @tf.function
        def step(*a, compiled=compiled):
            with tf.GradientTape() as tape:
                tape.watch(a)
                o, h, c = lstm_fused.fused_lstm(*a, matmul_dtype=mm_dtype, compiled=compiled)
                loss = tf.reduce_sum(o) + tf.reduce_sum(h) + tf.reduce_sum(c)
            return tape.gradient(loss, a)
        out[name] = lambda step=step: [g.numpy() for g in step(*args)]

    ops = cell_ops.load()
    mmt = mm_dtype or tf.float32
    if cell_ops.runs_sequence(ops, mmt):
        xz = tf.constant(rng.normal(0, 1, (seq, batch, 4 * units)).astype(np.float32))
        rk = tf.cast(args[4], mmt)
        h0, c0 = tf.cast(args[1], mmt), args[2]
        hs, _, saved = ops.charrnn_lstm_sequence_forward(xz, rk, h0, c0)
        d_hs = tf.ones([seq, batch, units])
        out["sequence_forward_op"] = lambda: ops.charrnn_lstm_sequence_forward(xz, rk, h0, c0)[0].numpy()
        out["sequence_backward_op"] = lambda: ops.charrnn_lstm_sequence_backward(
            d_hs, args[1], args[2], saved, rk)[0].numpy()

    h = tf.cast(args[1], mmt)
    rk = tf.cast(args[4], mmt)

    @tf.function
    def matmul_loop():
        acc = tf.zeros([batch, 4 * units], mmt)
        for _ in tf.range(seq):
            acc += tf.matmul(h, rk)
        return acc

    out["tf_matmul_loop"] = lambda: matmul_loop().numpy()

    # Two of the pieces fused_lstm's gradient runs around the ops, over all timesteps at once.
    hs = tf.constant(rng.normal(0, 0.5, (seq, batch, units)).astype(np.float32))
    dz = tf.constant(rng.normal(0, 0.1, (seq, batch, 4 * units)).astype(np.float32))
    weight_gradient = tf.function(lambda: tf.matmul(tf.reshape(hs, [-1, units]), tf.reshape(dz, [-1, 4 * units]),
                                                    transpose_a=True))
    bias_gradient = tf.function(lambda: tf.reduce_sum(tf.reduce_sum(dz, axis=1), axis=0))
    bias_gradient_one_reduce = tf.function(lambda: tf.reduce_sum(tf.reshape(dz, [-1, 4 * units]), axis=0))
    out["recurrent_weight_gradient"] = lambda: weight_gradient().numpy()
    out["bias_gradient"] = lambda: bias_gradient().numpy()
    out["bias_gradient_one_reduce"] = lambda: bias_gradient_one_reduce().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=csv_list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--variants", type=csv_list(None), default=None, help="time only these (default: all)")
    args = parser.parse_args()

    import tensorflow as tf

    mm_dtype = None if args.matmul_dtype == "float32" else tf.bfloat16
    report = {"machine": machine_info(), "matmul_dtype": args.matmul_dtype, "configs": {}}
    for name in args.configs:
        embedding, units, batch, seq, _ = CONFIGS[name]
        calls = variants(embedding, units, batch, seq, mm_dtype)
        if args.variants:
            unknown = sorted(set(args.variants) - set(calls))
            if unknown:
                parser.error(f"unknown variants {unknown}; choose from {sorted(calls)}")
            calls = {k: v for k, v in calls.items() if k in args.variants}
        for call in calls.values():  # trace and warm up, alike
            call()
            call()
        times = {k: [] for k in calls}
        for _ in range(args.repeats):
            for k, call in calls.items():
                start = time.perf_counter()
                call()
                times[k].append((time.perf_counter() - start) * 1e3)
        ms = {k: round(statistics.median(v), 1) for k, v in times.items()}
        flop = 2 * batch * units * 4 * units * seq  # one direction's recurrent matmuls
        result = {"batch": batch, "units": units, "input": embedding, "steps": seq, "ms": ms,
                  "runs_ms": {k: [round(x, 1) for x in v] for k, v in times.items()}}
        if "tf_matmul_loop" in ms:
            result["tf_matmul_loop_gflops"] = round(flop / ms["tf_matmul_loop"] / 1e6, 1)
            for op in ("sequence_forward_op", "sequence_backward_op"):
                if op in ms:
                    result[f"{op[:-3]}_over_tf_matmul_loop"] = round(ms[op] / ms["tf_matmul_loop"], 3)
        if {"cell", "sequence"} <= ms.keys():
            result["sequence_over_cell"] = round(ms["cell"] / ms["sequence"], 3)
        if {"tfops", "sequence"} <= ms.keys():
            result["sequence_over_tfops"] = round(ms["tfops"] / ms["sequence"], 3)
        report["configs"][name] = result
    print(json.dumps(report))


if __name__ == "__main__":
    main()
