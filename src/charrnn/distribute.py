"""Distribution strategies, and the training loop for several machines.

``default`` is one device (Keras' ``fit``), ``mirrored`` all local GPUs (without a GPU, every
logical CPU: ``CHARRNN_CPU_REPLICAS``), ``multi_worker`` several machines (``TF_CONFIG``). Both
distributed strategies train in ``fit_distributed``, a plain ``strategy.run`` loop whose step sums
the replicas' gradients before the optimizer clips: Keras' ``fit`` under a strategy clips each
replica's partial gradient first (so ``mirrored`` would train another model than one device), and
under ``multi_worker`` it fails (keras-team/keras#20585).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from charrnn import seams
from charrnn.batches import training_dataset
from charrnn.errors import UserError


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy ``train.strategy`` names; a distributed one prints its replica count."""
    if name == "mirrored":
        # Without a GPU, the logical CPUs that CHARRNN_CPU_REPLICAS made (one replica each).
        devices = None if tf.config.list_logical_devices("GPU") else [
            d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError("train.strategy is 'multi_worker' but TF_CONFIG is not set; see README 'Team setup'")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        return tf.distribute.get_strategy()
    here = ", ".join(d.rsplit("/", 1)[-1].removeprefix("device:") for d in strategy.extended.worker_devices)
    print(f"train: strategy {name}, {strategy.num_replicas_in_sync} replica(s) in sync (here: {here})", flush=True)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Worker 0 (or the task named "chief") writes checkpoints, the model and the MLflow run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def worker_windows(shards: list[tuple[str, int]], worker: int, workers: int) -> list[tuple[str, int, int]]:
    """Worker ``worker``'s equal share of the training windows, as (path, skip, take) per shard file.

    Shards are cut by size, so their window counts differ (the last one, tiny test shards); dealing
    whole files to workers would let the smaller side's windows be seen more often per pass. Instead
    the windows, in file order, are split into ``workers`` contiguous ranges of the same length
    (fewer than ``workers`` windows at the end are left out, as ``drop_remainder`` leaves out a last
    partial batch): each window is in exactly one range, and every worker's pass is equally long.
    """
    share = sum(n for _, n in shards) // workers
    start, end = worker * share, (worker + 1) * share
    pieces, offset = [], 0
    for path, n in shards:
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            pieces.append((path, lo - offset, hi - lo))
        offset += n
    return pieces


def make_train_step(model, strategy, global_batch: int):
    """One optimizer step on one global batch, spread over the strategy's replicas, equal to the
    single-device step on that batch (keras.Model.fit's).

    Each replica computes the gradient of its share of the global mean loss (scaled by the loss
    scale under ``mixed_float16``) and the replicas sum them (all-reduce) *before* the optimizer
    sees them, so it unscales, checks finiteness, clips (``clipnorm``) and steps on the gradient of
    the whole global batch, as on one device. Keras' optimizer would otherwise clip each replica's
    partial gradient and only then sum them (its ``_all_reduce_sum_gradients`` runs after the
    clip); here it is told that the gradients arrive summed.
    """
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    optimizer = model.optimizer
    variables = model.trainable_variables
    if not optimizer.built:  # its slots created here, not inside the traced step of several replicas
        with strategy.scope():
            optimizer.build(variables)
    for opt in {id(o): o for o in (optimizer, getattr(optimizer, "inner_optimizer", optimizer))}.values():
        seams.declare_gradients_summed(opt)  # the gradients arrive summed over the replicas

    @tf.function
    def train_step(iterator):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                per_sequence = tf.reduce_mean(per_token(y, model(x, training=True)), axis=1)
                loss = tf.reduce_sum(per_sequence) / global_batch  # this replica's share of the mean
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
            summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
            optimizer.apply(summed, variables)  # unscale, check, clip, step: as fit does on one device
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)), axis=None)

    return train_step


def fit_distributed(model, strategy, config, train_shards, seq_length, val_ds, steps, initial_epoch,
                    callbacks, verbose):
    """The training loop under ``mirrored`` and ``multi_worker``. Each input pipeline (one per
    worker) streams its equal share of the windows (``worker_windows``) in per-replica batches, R
    of them a step for its R replicas, so the replicas of one step hold consecutive slices of the
    batch one device would take from that share (with one worker: the single-device global batch,
    ``tests/test_distributed.py``); one optimizer step per global batch (``make_train_step``); every
    worker scores the same validation batches. Callbacks get the same calls and logs as under
    ``fit`` (running mean ``loss`` per batch, ``loss``/``val_loss`` per epoch).
    """
    replicas_total = strategy.num_replicas_in_sync
    if config.batch_size % replicas_total:
        raise UserError(f"train.batch_size={config.batch_size} does not split over {replicas_total} replicas; "
                        f"use a multiple of {replicas_total}")

    def dataset_fn(context):
        pieces = worker_windows(train_shards, context.input_pipeline_id, context.num_input_pipelines)
        batch_size = context.get_per_replica_batch_size(config.batch_size)
        replicas = replicas_total // context.num_input_pipelines  # batches this pipeline gives per step
        if sum(take for _, _, take in pieces) < batch_size * replicas:
            raise UserError(f"{context.num_input_pipelines} workers leave each fewer training windows than its "
                            f"share of train.batch_size={config.batch_size}; use fewer workers or a longer corpus")
        return training_dataset(pieces, seq_length, initial_epoch * steps * replicas, batch_size=batch_size,
                                shuffle_buffer=config.shuffle_buffer, seed=config.seed, replicas=replicas)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    train_step = make_train_step(model, strategy, config.batch_size)

    @tf.function
    def val_step(x, y):
        return tf.reduce_mean(per_token(y, model(x, training=False)))

    callbacks = keras.callbacks.CallbackList(callbacks, model=model)
    callbacks.on_train_begin()
    for epoch in range(initial_epoch, config.epochs):
        if verbose:
            print(f"Epoch {epoch + 1}/{config.epochs}", flush=True)
        callbacks.on_epoch_begin(epoch)
        bar = keras.utils.Progbar(steps, verbose=verbose)
        losses = []
        for i in range(steps):
            losses.append(float(train_step(iterator)))
            bar.update(i + 1, [("loss", losses[-1])])
            callbacks.on_train_batch_end(i, {"loss": float(np.mean(losses))})
        callbacks.on_test_begin()  # as fit's validation: SwapEMAWeights scores the moving average
        scored = [(float(val_step(x, y)), int(x.shape[0])) for x, y in val_ds]
        callbacks.on_test_end()
        logs = {"loss": float(np.mean(losses)),
                "val_loss": sum(l * n for l, n in scored) / sum(n for _, n in scored)}
        if verbose:
            print(f"loss {logs['loss']:.4f} - val_loss {logs['val_loss']:.4f}", flush=True)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()
