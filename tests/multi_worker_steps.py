"""Run a few optimizer steps on fixed global batches and save the weights (used by test_distributed).

Each VARIANT trains a fresh model (same seed) and saves ``OUT_DIR/VARIANT.npz``, or with TF_CONFIG
set ``OUT_DIR/VARIANT-<worker index>.npz``; one process runs several, so the tests pay TensorFlow's
start-up once. With TF_CONFIG set, this process is one worker of a MultiWorkerMirroredStrategy
cluster and feeds its slice of every global batch through ``charrnn.distribute.make_train_step``
(variants ``combined``, ``per-replica``, ``combined-mixed_float16``). Without it, the process has two
logical CPUs: ``mirrored`` and ``mirrored-per-replica`` train under MirroredStrategy, each replica
fed its slice the same way, and ``single`` (``single-mixed_float16``) is the single-device reference
on the whole global batches with ``keras.Model.train_on_batch`` (fit's step). ``per-replica`` runs
the old, wrong step (``apply_gradients`` inside ``strategy.run``: each replica's partial gradient
clipped before the sum, as Keras' ``fit`` does under a strategy) to show the test fails. Every
variant trains with AdamW (weight decay 0.1), the default optimizer, whose decoupled decay must also
happen once per global step; the mixed_float16 ones with Adam and loss scaling.

    python multi_worker_steps.py OUT_DIR VARIANT...
"""

from __future__ import annotations

import argparse
import json
import os

import keras
import numpy as np
import tensorflow as tf

from charrnn import lstm_cpu
from charrnn.distribute import make_strategy, make_train_step
from charrnn.model import build_model
from charrnn.optimizer import compile_model

VOCAB, LENGTH, GLOBAL_BATCH, STEPS, CLIPNORM = 20, 12, 8, 3, 0.05


def global_batches() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, size=(STEPS, GLOBAL_BATCH, LENGTH + 1), dtype=np.int32)


def build(precision: str, weight_decay: float):
    keras.utils.set_random_seed(1)
    model = build_model(VOCAB, embedding_dim=8, rnn_units=16, num_layers=1, dropout=0.0, cell="lstm",
                        precision=precision)
    lstm_cpu.install_model(model)
    compile_model(model, 0.01, clipnorm=CLIPNORM, weight_decay=weight_decay)
    return model


def per_replica_apply_step(model, strategy):
    """The step the pipeline took before: clip and apply per replica (kept here only as a control)."""
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    @tf.function
    def step(iterator):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.reduce_mean(per_token(y, model(x, training=True)), axis=1)) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)), axis=None)

    return step


def train_variant(variant: str, strategy, batches: np.ndarray):
    """The weights and the per-step losses of one variant."""
    precision = "mixed_float16" if variant.endswith("mixed_float16") else "float32"
    weight_decay = 0.0 if precision == "mixed_float16" else 0.1
    per_replica_apply = variant.endswith("per-replica")
    if strategy is None:
        model = build(precision, weight_decay)
        return model, [float(model.train_on_batch(b[:, :-1], b[:, 1:])) for b in batches]
    with strategy.scope():
        model = build(precision, weight_decay)
        if per_replica_apply:  # its slots before tracing (make_train_step does the same)
            model.optimizer.build(model.trainable_variables)

    def dataset_fn(context):
        # Per replica, the consecutive slices of each global batch (the pipeline's layout).
        replicas = strategy.num_replicas_in_sync // context.num_input_pipelines
        rows = GLOBAL_BATCH // strategy.num_replicas_in_sync
        first = context.input_pipeline_id * replicas
        slices = [batches[:, (first + r) * rows:(first + r + 1) * rows] for r in range(replicas)]
        local = np.stack(slices, axis=1).reshape(-1, rows, LENGTH + 1)  # step-major, replica-minor
        return tf.data.Dataset.from_tensor_slices((local[..., :-1], local[..., 1:]))

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    step = (per_replica_apply_step(model, strategy) if per_replica_apply
            else make_train_step(model, strategy, GLOBAL_BATCH))
    return model, [float(step(iterator)) for _ in range(STEPS)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    batches = global_batches()
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if os.environ.get("TF_CONFIG") else None
    if worker is None:  # before TensorFlow initialises its devices
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    cluster = make_strategy("multi_worker") if worker is not None else None
    for variant in args.variants:
        if worker is not None:
            strategy = cluster
        elif variant.startswith("mirrored"):
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        else:
            strategy = None
        model, losses = train_variant(variant, strategy, batches)
        name = variant if worker is None else f"{variant}-{worker}"
        optimizer = model.optimizer
        np.savez(os.path.join(args.out_dir, f"{name}.npz"), *[v.numpy() for v in model.trainable_variables],
                 meta=json.dumps({"losses": losses, "optimizer": type(optimizer).__name__,
                                  "iterations": int(optimizer.iterations.numpy())}))


if __name__ == "__main__":
    main()
