"""GPU check (under 5 minutes on one NVIDIA GPU): the cuDNN LSTM, `mirrored` against one device,
mixed precision training and generation, tokens/s per precision. Prints one JSON object.

    python benchmarks/gpu_check.py            # on a machine with an NVIDIA GPU (pip install -e ".[gpu]")

On a machine without a GPU it prints {"skipped": ...} and exits 0.
"""

from __future__ import annotations

import json
import time

import keras
import numpy as np
import tensorflow as tf

from charrnn import lstm_cpu
from charrnn.generate import Generator
from charrnn.model import build_model
from charrnn.optimizer import compile_model
from charrnn.sampling import SamplingOptions
from charrnn.vocabulary import Vocabulary

VOCAB, LENGTH = 65, 100
VOCABULARY = Vocabulary([chr(32 + i) for i in range(VOCAB)])


def batches(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(steps, batch, LENGTH + 1), dtype=np.int32)


def model_for(precision: str, units: int = 1024, embedding: int = 256, use_cudnn="auto"):
    keras.utils.set_random_seed(1)
    model = build_model(VOCAB, embedding_dim=embedding, rnn_units=units, num_layers=1, dropout=0.0, cell="lstm",
                        precision=precision)
    if use_cudnn is False:
        model.get_layer("lstm").use_cudnn = False
    assert lstm_cpu.install_model(model) == 0, "the CPU kernel must stay out of the way on a GPU"
    compile_model(model, 1e-3, clipnorm=1.0)
    return model


def tokens_per_second(model, data: np.ndarray) -> float:
    model.train_on_batch(data[0, :, :-1], data[0, :, 1:])  # trace and warm up
    start = time.perf_counter()
    for b in data[1:]:
        model.train_on_batch(b[:, :-1], b[:, 1:])
    float(model.optimizer.iterations.numpy())
    return (len(data) - 1) * data.shape[1] * LENGTH / (time.perf_counter() - start)


def cudnn_check() -> dict:
    data = batches(64, 6)
    fused = tokens_per_second(model_for("float32"), data)
    generic = tokens_per_second(model_for("float32", use_cudnn=False), data)
    model = model_for("float32")
    graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(
        tf.TensorSpec([64, LENGTH], tf.int32)).graph
    ops = sorted({op.type for op in graph.get_operations() if "Cudnn" in op.type})
    return {"cudnn_ops_in_graph": ops, "tokens_per_s_cudnn": round(fused), "tokens_per_s_generic": round(generic),
            "cudnn_over_generic": round(fused / generic, 2)}


def mirrored_check() -> dict:
    """`mirrored` on all local GPUs against one device, on the same global batches."""
    gpus = tf.config.list_logical_devices("GPU")
    data = batches(64, 4, seed=2)
    single = model_for("float32", units=256, embedding=64)
    for b in data:
        single.train_on_batch(b[:, :-1], b[:, 1:])
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        mirrored = model_for("float32", units=256, embedding=64)
    for b in data:
        mirrored.train_on_batch(b[:, :-1], b[:, 1:])
    diff = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
               for a, b in zip([v.numpy() for v in mirrored.trainable_variables],
                               [v.numpy() for v in single.trainable_variables]))
    return {"gpus": len(gpus), "replicas": strategy.num_replicas_in_sync, "max_relative_weight_difference": diff,
            "same_within_1e-4": diff < 1e-4}


def precision_check(precision: str) -> dict:
    model = model_for(precision)
    data = batches(64, 8, seed=3)
    losses = [float(model.train_on_batch(b[:, :-1], b[:, 1:])) for b in data]
    speed = tokens_per_second(model, batches(64, 6, seed=4))
    (text,) = Generator(model, VOCABULARY).generate("ab", SamplingOptions(length=100, seed=1))
    return {"optimizer": type(model.optimizer).__name__, "first_loss": losses[0], "last_loss": losses[-1],
            "loss_fell": losses[-1] < losses[0], "generated_chars": len(text) - 2, "tokens_per_s": round(speed)}


def main():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print(json.dumps({"skipped": "no GPU visible to TensorFlow"}))
        return
    started = time.time()
    report = {"gpu": tf.config.experimental.get_device_details(gpus[0]), "gpus": len(gpus),
              "tensorflow": tf.__version__, "keras": keras.__version__, "cudnn": cudnn_check(),
              "mirrored": mirrored_check(),
              "precision": {p: precision_check(p) for p in ("float32", "mixed_float16", "mixed_bfloat16")}}
    report["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
