"""Time to quality: the best val loss reachable in a wall-clock training budget.

    python benchmarks/time_to_quality.py --corpus ../shared/data/tinyshakespeare.txt --minutes 10

Trains with the pipeline's own code (vectorize, sequences, build_model, the resumable tf.data
stream) for ``--minutes`` of training time, stopping mid-epoch when the budget is spent. Every
``--report-every`` training seconds it scores the first ``--probe-batches`` val batches and prints
(elapsed training seconds, val loss); that scoring is not counted in the budget. The final val
loss is computed over the whole val split (the last 10% of the text). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import keras

from charrnn import sequences
from charrnn.config import DataConfig, TrainConfig
from charrnn.model import build_model, compile_model
from charrnn.train import configure_determinism, training_dataset, validation_dataset
from charrnn.vectorize import vectorize


class Budget(keras.callbacks.Callback):
    """Stops training when the training-time budget is spent; probes val loss on a schedule."""

    def __init__(self, seconds, report_every, probe):
        super().__init__()
        self.seconds, self.report_every, self.probe = seconds, report_every, probe
        self.trained, self.series, self._last_report = 0.0, [], 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.trained += time.perf_counter() - self._start
        if self.trained - self._last_report >= self.report_every:
            self._last_report = self.trained
            loss = self.model.evaluate(self.probe, verbose=0)
            self.series.append((round(self.trained, 1), round(float(loss), 4)))
            print(f"  {self.trained:7.1f} s  val loss {loss:.4f} (probe)", flush=True)
        if self.trained >= self.seconds:
            self.model.stop_training = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--report-every", type=float, default=60.0, help="training seconds between probes")
    parser.add_argument("--probe-batches", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=100)
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("batch_size", "embedding_dim", "rnn_units", "num_layers", "dropout",
                          "learning_rate", "clipnorm", "precision", "seed"):
            kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" ")[0], float)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)
    args = parser.parse_args()
    config = TrainConfig(batch_size=args.batch_size, embedding_dim=args.embedding_dim, rnn_units=args.rnn_units,
                         num_layers=args.num_layers, dropout=args.dropout, learning_rate=args.learning_rate,
                         clipnorm=args.clipnorm, precision=args.precision, seed=args.seed, epochs=1_000)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vectorized = vectorize(DataConfig(source=args.corpus, val_fraction=0.1), tmp / "vec", tmp / "cache")
        manifest = sequences.build_sequences(tmp / "vec", tmp / "seq", args.seq_length, 32.0)
        train_shards = [(p, s["windows"]) for p, s in zip(sequences.shard_paths(tmp / "seq", manifest, "train"),
                                                         manifest["splits"]["train"]["shards"])]
        val_paths = sequences.shard_paths(tmp / "seq", manifest, "val")
        val_windows = manifest["splits"]["val"]["windows"]
        configure_determinism(config)
        model = build_model(len(vectorized.vocabulary), config.embedding_dim, config.rnn_units,
                            config.num_layers, config.dropout, config.precision)
        compile_model(model, config.learning_rate, config.clipnorm)
        val_ds = validation_dataset(val_paths, args.seq_length, 64, val_windows)
        budget = Budget(args.minutes * 60, args.report_every, val_ds.take(args.probe_batches))
        print(f"{model.count_params():,} parameters; {vectorized.train_chars:,} train / "
              f"{vectorized.val_chars:,} val chars; budget {args.minutes} min of training", flush=True)
        start = time.perf_counter()
        model.fit(training_dataset(train_shards, args.seq_length, config, 0), epochs=1,
                  steps_per_epoch=10**9, callbacks=[budget], verbose=0)
        wall = time.perf_counter() - start
        final = float(model.evaluate(val_ds, verbose=0))
    steps = model.optimizer.iterations.numpy().item()
    tokens = steps * config.batch_size * args.seq_length
    print(f"final val loss {final:.4f} nats/char ({final / math.log(2):.4f} bits/char) over the whole val split "
          f"after {budget.trained:.0f} s of training ({steps} steps, {tokens:,} tokens, "
          f"{tokens / budget.trained:,.0f} tokens/s)")
    print(json.dumps({"val_loss": round(final, 4), "val_bpc": round(final / math.log(2), 4),
                      "train_seconds": round(budget.trained, 1), "wall_seconds": round(wall, 1),
                      "steps": steps, "tokens": tokens, "series": budget.series,
                      "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"}}))


if __name__ == "__main__":
    main()
