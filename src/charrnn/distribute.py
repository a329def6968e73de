"""Distribution strategies, and the training loop for several machines.

``default`` is one device, ``mirrored`` all local GPUs (Keras' ``fit`` splits each global batch),
``multi_worker`` several machines (``TF_CONFIG``), where Keras 3's ``fit()`` fails
(keras-team/keras#20585) and ``fit_multi_worker`` runs a plain ``strategy.run`` loop instead.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from charrnn.batches import training_dataset
from charrnn.errors import UserError


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError("train.strategy is 'multi_worker' but TF_CONFIG is not set; see README 'Team setup'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Worker 0 (or the task named "chief") writes checkpoints, the model and the MLflow run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def fit_multi_worker(model, strategy, config, train_shards, seq_length, val_ds, steps, initial_epoch,
                     callbacks, verbose):
    """The training loop under MultiWorkerMirroredStrategy. Each worker streams its own subset of
    the shard files and batches its share of the global batch; the optimizer all-reduces the
    gradients; every worker scores the same validation batches. Callbacks get the same calls and
    logs as under ``fit`` (running mean ``loss`` per batch, ``loss``/``val_loss`` per epoch).
    """

    def dataset_fn(context):
        shards = train_shards[context.input_pipeline_id::context.num_input_pipelines]
        if not shards:
            raise UserError(f"{context.num_input_pipelines} workers but only {len(train_shards)} train "
                            "shard(s); lower sequences.shard_size_mb so every worker gets a shard")
        local = dataclasses.replace(config, batch_size=context.get_per_replica_batch_size(config.batch_size))
        return training_dataset(shards, seq_length, local, initial_epoch * steps)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    @tf.function
    def train_step(iterator):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                per_sequence = tf.reduce_mean(per_token(y, model(x, training=True)), axis=1)
                loss = tf.reduce_sum(per_sequence) / config.batch_size  # this replica's share of the mean
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)), axis=None)

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
        scored = [(float(val_step(x, y)), int(x.shape[0])) for x, y in val_ds]
        logs = {"loss": float(np.mean(losses)),
                "val_loss": sum(l * n for l, n in scored) / sum(n for _, n in scored)}
        if verbose:
            print(f"loss {logs['loss']:.4f} - val_loss {logs['val_loss']:.4f}", flush=True)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()
