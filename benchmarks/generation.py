"""Generation speed: the tutorial's loops against the project's compiled generator, in one run.

    python benchmarks/generation.py [--model models/char_rnn] [--repeats 3]

Without --model it uses the seed architecture (embedding 256, LSTM 1024, vocabulary 65) with
random weights: speed does not depend on the weights. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import keras
import tensorflow as tf

from charrnn.generate import Generator
from charrnn.sampling import SamplingOptions
from charrnn.model import build_model, load_model_dir
from charrnn.vocabulary import Vocabulary


def tutorial_model(model: keras.Model) -> keras.Model:
    """The tutorial's generation model: same weights, LSTM returning its state, called per step."""
    lstm = model.get_layer("lstm")
    ids = keras.Input(shape=(None,), dtype="int32")
    h0, c0 = keras.Input(shape=(lstm.units,)), keras.Input(shape=(lstm.units,))
    x = keras.layers.Embedding(*model.get_layer("embedding").embeddings.shape)(ids)
    x, h, c = keras.layers.LSTM(lstm.units, return_sequences=True, return_state=True)(x, initial_state=[h0, c0])
    logits = keras.layers.Dense(model.get_layer("logits").units)(x)
    clone = keras.Model([ids, h0, c0], [logits, h, c])
    clone.set_weights(model.get_weights())
    return clone


def eager_chars_per_s(step_model, n: int) -> float:
    """The tutorial's plain loop: one eager model call per character, from Python (warmed up by
    a few calls first, as the compiled cases are traced before they are timed)."""
    units = step_model.inputs[1].shape[-1]
    ids, h, c = tf.constant([[1]]), tf.zeros([1, units]), tf.zeros([1, units])
    for _ in range(8):  # warm-up: first-call op dispatch and kernel selection
        logits, _, _ = step_model([ids, h, c])
        tf.random.categorical(logits[:, -1, :], num_samples=1, dtype=tf.int32)
    start = time.perf_counter()
    for _ in range(n):
        logits, h, c = step_model([ids, h, c])
        ids = tf.random.categorical(logits[:, -1, :], num_samples=1, dtype=tf.int32)
    return n / (time.perf_counter() - start)


def onestep_chars_per_s(step_model, n: int) -> float:
    """The tutorial's OneStep: the step in tf.function, the loop still in Python."""
    units = step_model.inputs[1].shape[-1]

    @tf.function
    def one_step(ids, h, c):
        logits, h, c = step_model([ids, h, c])
        return tf.random.categorical(logits[:, -1, :], num_samples=1, dtype=tf.int32), h, c

    ids, h, c = tf.constant([[1]]), tf.zeros([1, units]), tf.zeros([1, units])
    one_step(ids, h, c)  # trace
    start = time.perf_counter()
    for _ in range(n):
        ids, h, c = one_step(ids, h, c)
    ids.numpy()
    return n / (time.perf_counter() - start)


def generator_chars_per_s(generator: Generator, batch: int, n: int) -> float:
    """The project's generator: K streams, the per-character loop compiled. Total chars/s over all streams."""
    prime = generator.vocabulary.chars[1]
    generator.generate(prime, SamplingOptions(length=8, num_samples=batch))  # trace
    start = time.perf_counter()
    generator.generate(prime, SamplingOptions(length=n, num_samples=batch, seed=1))
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="trained model folder (default: random seed architecture)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chars", type=int, default=1200, help="characters per stream timed, for every case")
    args = parser.parse_args()

    if args.model:
        model, vocabulary = load_model_dir(args.model)
    else:
        vocabulary = Vocabulary([chr(c) for c in range(32, 32 + 65)])
        keras.utils.set_random_seed(0)
        model = build_model(len(vocabulary), embedding_dim=256, rnn_units=1024, num_layers=1, dropout=0.0,
                            cell="lstm")
    step_model = tutorial_model(model)
    generator = Generator(model, vocabulary)
    n = args.chars
    cases = {  # every case generates n characters per stream
        "eager": lambda: eager_chars_per_s(step_model, n),
        "onestep": lambda: onestep_chars_per_s(step_model, n),
        "batch1": lambda: generator_chars_per_s(generator, 1, n),
        "batch64": lambda: generator_chars_per_s(generator, 64, n),
    }
    results = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every case alike
        for name, case in cases.items():
            results[name].append(case())
    medians = {name: statistics.median(v) for name, v in results.items()}
    medians["batch64_per_stream"] = medians["batch64"] / 64  # what one of the 64 streams gets
    results["batch64_per_stream"] = [v / 64 for v in results["batch64"]]
    eager = medians["eager"]
    print(f"{'method':<10} {'chars/s (median)':>18} {'x eager':>9}   runs")
    for name, value in medians.items():
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        print(f"{name:<10} {value:>18,.0f} {value / eager:>9.1f}   [{runs}]")
    summary = {f"{name}_chars_per_s": round(value, 1) for name, value in medians.items()}
    summary.update(batch1_vs_onestep=round(medians["batch1"] / medians["onestep"], 2),
                   batch1_vs_eager=round(medians["batch1"] / eager, 1),
                   batch64_vs_eager=round(medians["batch64"] / eager, 1),
                   batch64_per_stream_vs_eager=round(medians["batch64_per_stream"] / eager, 2),
                   chars_per_stream=n,
                   repeats=args.repeats, model=args.model or "random seed architecture (65 symbols)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
