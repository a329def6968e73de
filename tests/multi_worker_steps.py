"""Run a few optimizer steps on fixed global batches and save the weights (used by test_distributed).

With TF_CONFIG set, this process is one worker of a MultiWorkerMirroredStrategy cluster and feeds
its slice of every global batch through ``charrnn.distribute.make_train_step``; with ``--mirrored``
it is one process with two logical CPUs under MirroredStrategy, each replica fed its slice the same
way; otherwise the single-device reference trains on the whole global batches with
``keras.Model.train_on_batch`` (fit's step). ``--per-replica-apply`` runs the old, wrong step
(``apply_gradients`` inside ``strategy.run``: each replica's partial gradient clipped before the
sum, as Keras' ``fit`` does under a strategy) to show the test fails. ``--weight-decay`` trains
with AdamW, the default optimizer, whose decoupled decay must also happen once per global step.

    python multi_worker_steps.py OUT.npz [--mirrored] [--per-replica-apply] [--precision P] [--weight-decay W]
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
from charrnn.model import build_model, compile_model

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-replica-apply", action="store_true")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--mirrored", action="store_true")
    args = parser.parse_args()
    batches = global_batches()
    if args.mirrored:  # before TensorFlow initialises its devices
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    if os.environ.get("TF_CONFIG") or args.mirrored:
        strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if args.mirrored
                    else make_strategy("multi_worker"))
        with strategy.scope():
            model = build(args.precision, args.weight_decay)
            if args.per_replica_apply:  # its slots before tracing (make_train_step does the same)
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
        step = (per_replica_apply_step(model, strategy) if args.per_replica_apply
                else make_train_step(model, strategy, GLOBAL_BATCH))
        losses = [float(step(iterator)) for _ in range(STEPS)]
    else:
        model = build(args.precision, args.weight_decay)
        losses = [float(model.train_on_batch(b[:, :-1], b[:, 1:])) for b in batches]
    optimizer = model.optimizer
    np.savez(args.out, *[v.numpy() for v in model.trainable_variables],
             meta=json.dumps({"losses": losses, "optimizer": type(optimizer).__name__,
                              "iterations": int(optimizer.iterations.numpy())}))


if __name__ == "__main__":
    main()
