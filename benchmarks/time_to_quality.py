"""Time to quality: the best val loss reachable in a wall-clock training budget.

    python benchmarks/time_to_quality.py --corpus ../shared/data/tinyshakespeare.txt --minutes 10

Trains with the pipeline's own code (vectorize, sequences, build_model, the resumable tf.data
stream) for ``--minutes`` of training time, stopping mid-epoch when the budget is spent. Every
``--report-every`` training seconds it scores the first ``--probe-batches`` val batches and prints
(elapsed training seconds, val loss); that scoring is not counted in the budget.

Two final figures, both over the whole val split (the last 10% of the text):
- ``val_loss``: the pipeline's metric (evaluate stage): independent windows of ``--seq-length``
  characters, each read from a zero state, so the first characters of every window are guessed
  with little context.
- ``val_loss_stream``: evaluate's ``eval_val_loss_carried``: the same val windows read as
  ``CARRIED_STREAMS`` contiguous streams with the LSTM state carried across, as char-rnn evaluates:
  each character's loss given all the text before it in its stream.

When training ran in another precision than float32, ``val_loss_float32`` is the first figure again
with the same (float32) weights read by a float32 model: what the precision costs at inference
apart from what it cost in training.

With no options it trains the model of ``params.yaml``'s ``train`` section (the pipeline's
default; ``--preset NAME``: params.yaml's with ``charrnn preset NAME``'s values) the way the train stage does: the fast CPU LSTM installed, ``train.precision`` and
``train.lstm_kernel`` resolved (``auto``), and the pipeline's own learning-rate schedule
(``train.lr_decay_fraction``, ``lr_decay_shape`` and ``lr_decay_to``: ``charrnn.optimizer.CoolDown``), laid out over the steps the budget allows at
the speed a short calibration run measured (its mean step time after 5 warm-up steps; the last line
says over how many steps it was laid out and how many were trained). What can be varied: the model
(``--rnn-units``, ``--num-layers``, ``--cell gru``, ...), the regularisers (``--dropout``,
``--input-dropout``, ``--variational-dropout true``, ``--weight-decay``, ``--weight-drop``,
``--ema-momentum``: a number, or ``null`` for off; with one, the final figures score the moving average,
as the train stage saves it; every other ``train`` key too, ``--ema-warmup true``, ``--adam-beta-2``, ...),
``--jit-compile`` (XLA), the schedule (``--lr-decay-fraction``;
``--schedule time`` for the older schedule on elapsed time, with ``--warmup-seconds``), and the
data layout: ``windows`` (the pipeline's: shuffled independent windows, zero state each)
or ``streams`` (char-rnn's: the training text cut into ``batch-size`` contiguous streams read in
order, the LSTM state carried from batch to batch; ``--state-reset P`` zeroes each stream's state
before a batch with probability P). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

from charrnn.prologue import BFC_ALLOCATOR  # noqa: E402

os.environ.setdefault(*BFC_ALLOCATOR)  # TensorFlow's allocator as the stages set it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from charrnn import artifacts, autotune, lstm_cpu, sequences
from charrnn.cli import PRESETS
from charrnn.config import TrainConfig, load_params, replace
from charrnn.model import model_from_config
from charrnn.optimizer import compile_model, learning_rate_schedule
from charrnn.batches import training_dataset, validation_dataset
from charrnn.evaluate import CARRIED_STREAMS, carried_state_loss
from charrnn.train import configure_determinism
from charrnn.artifacts import load_ids
from charrnn.vectorize import vectorize


def learning_rate_at(fraction: float, peak: float, args) -> float:
    """The learning rate after ``fraction`` of the time budget: the peak, then a cosine decay to a
    tenth of it over the last ``--lr-decay-fraction`` of the budget (train.lr_decay_fraction's
    schedule, on time instead of steps); an optional linear warm-up from 1% over the first
    ``--warmup-seconds``."""
    warmup = args.warmup_seconds / (args.minutes * 60)
    if fraction < warmup:
        return peak * max(fraction / warmup, 0.01)
    decay_start = max(1 - args.lr_decay_fraction, warmup)
    if args.lr_decay_fraction == 0 or fraction < decay_start:
        return peak
    progress = min((fraction - decay_start) / max(1 - decay_start, 1e-9), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Budget(keras.callbacks.Callback):
    """Stops training when the training-time budget is spent; sets the learning rate from the
    time spent; probes val loss on a schedule (with a stateless copy, so a stateful model's
    carried state is left alone)."""

    def __init__(self, seconds, report_every, probe, scorer, args):
        super().__init__()
        self.seconds, self.report_every, self.probe, self.scorer, self.args = seconds, report_every, probe, scorer, args
        self.trained, self.series, self._last_report = 0.0, [], 0.0

    def on_train_batch_begin(self, batch, logs=None):
        if self.args.schedule == "time":
            lr = learning_rate_at(self.trained / self.seconds, self.args.learning_rate, self.args)
            self.model.optimizer.learning_rate.assign(lr)
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.trained += time.perf_counter() - self._start
        if self.trained - self._last_report >= self.report_every:
            self._last_report = self.trained
            loss = self.scorer(self.model).evaluate(self.probe, verbose=0)
            self.series.append((round(self.trained, 1), round(float(loss), 4)))
            steps = int(self.model.optimizer.iterations.numpy())
            lr = float(self.model.optimizer.learning_rate)
            print(f"  {self.trained:7.1f} s  val loss {loss:.4f} (probe)  step {steps}  lr {lr:.2e}", flush=True)
        if self.trained >= self.seconds:
            self.model.stop_training = True


class StateResets(keras.callbacks.Callback):
    """``--layout streams``: before each batch, zero each stream's carried state with probability
    ``p`` (drawn from ``seed``), so that the model also learns to start a text cold, as the
    pipeline's metric (and a window from a zero state) asks of it."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.rng = p, np.random.default_rng(seed)

    def on_train_begin(self, logs=None):
        self.states = [s for layer in self.model.layers if getattr(layer, "stateful", False) for s in layer.states]

    def on_train_batch_begin(self, batch, logs=None):
        keep = (self.rng.random(self.states[0].shape[0]) >= self.p).astype(np.float32)[:, None]
        for state in self.states:
            state.assign(state * tf.constant(keep, state.dtype))


class StepTimer(keras.callbacks.Callback):
    """Seconds of every train step (data wait included), for the calibration."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def stream_batches(ids: np.ndarray, batch_size: int, seq_length: int) -> tf.data.Dataset:
    """char-rnn's layout: ``batch_size`` contiguous streams; batch t holds chars [t*L, (t+1)*L]
    of every stream, so a carried state continues the text. Pass p shifts every stream by
    (37 p mod L) characters, so the passes cut the text at different places. Pure tf.data: the
    same layout from a Python generator (``from_generator``) trained at half the speed here."""
    ids = tf.constant(np.asarray(ids, dtype=np.int32))
    per_stream = (int(ids.shape[0]) - seq_length - 1) // batch_size
    steps = per_stream // seq_length
    starts = tf.range(batch_size, dtype=tf.int64)[:, None] * per_stream + tf.range(seq_length + 1, dtype=tf.int64)[None, :]

    def one_pass(p):
        offset = (p * 37) % seq_length

        def batch(t):
            chunk = tf.gather(ids, starts + offset + t * seq_length)
            return chunk[:, :-1], chunk[:, 1:]

        return tf.data.Dataset.range(steps).map(batch)

    return tf.data.Dataset.range(1 << 62).flat_map(one_pass).prefetch(tf.data.AUTOTUNE)


# TrainConfig's keys that are not model or training options here (how long, where, how logged).
NOT_OPTIONS = ("epochs", "steps_per_epoch", "validation_steps", "strategy", "shuffle_buffer", "deterministic",
               "jit_compile", "log_every_steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--report-every", type=float, default=60.0, help="training seconds between probes")
    parser.add_argument("--probe-batches", type=int, default=4)
    parser.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--warmup-seconds", type=float, default=0.0)
    parser.add_argument("--calibration-steps", type=int, default=40)
    parser.add_argument("--layout", choices=["windows", "streams"], default="windows")
    parser.add_argument("--state-reset", type=float, default=0.0,
                        help="streams: the probability that a stream's carried state is zeroed before a batch")
    parser.add_argument("--params", default="params.yaml", help="defaults of the model options (the pipeline's)")
    parser.add_argument("--schedule", choices=["pipeline", "time"], default="pipeline",
                        help="pipeline: train.lr_decay_fraction's step schedule (charrnn.optimizer.CoolDown), laid out over "
                             "the steps the budget allows at the speed measured in a calibration run; "
                             "time: the older schedule on elapsed time (with --warmup-seconds)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="start from a named preset of `charrnn preset` (params.yaml's values with the preset's)")
    known, _ = parser.parse_known_args()
    data_defaults, defaults, sequence_defaults = load_params(known.params, "data", "train", "sequences")
    if known.preset:
        preset = PRESETS[known.preset]
        defaults = replace(defaults, **{k.removeprefix("train."): v for k, v in preset.items() if k.startswith("train.")})
        sequence_defaults = replace(sequence_defaults, **{k.removeprefix("sequences."): v for k, v in preset.items()
                                                          if k.startswith("sequences.")})
    parser.add_argument("--seq-length", type=int, default=sequence_defaults.seq_length)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in NOT_OPTIONS:
            kind = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes"),
                    }.get(str(field.type).split(" ")[0], float)
            if str(field.type).endswith("| None"):  # --ema-momentum null: off
                kind = (lambda k: lambda v: None if v.lower() in ("null", "none") else k(v))(kind)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=getattr(defaults, field.name))
    args = parser.parse_args()
    if args.state_reset and args.layout != "streams":
        parser.error("--state-reset resets the carried state of --layout streams; add --layout streams")
    if not 0.0 <= args.state_reset <= 1.0:
        parser.error(f"--state-reset is a probability, between 0 and 1, not {args.state_reset}")
    config = replace(defaults, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                  if f.name not in NOT_OPTIONS},
                     epochs=1_000, jit_compile=args.jit_compile)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vectorized = vectorize(replace(data_defaults, source=args.corpus, sha256=None), tmp / "vec", tmp / "cache")
        manifest = sequences.build_sequences(tmp / "vec", tmp / "seq", args.seq_length, 32.0)
        train_shards = [(p, s["windows"]) for p, s in zip(artifacts.shard_paths(tmp / "seq", manifest, "train"),
                                                         manifest["splits"]["train"]["shards"])]
        val_paths = artifacts.shard_paths(tmp / "seq", manifest, "val")
        val_windows = manifest["splits"]["val"]["windows"]
        vocab_size = len(vectorized.vocabulary)
        kernels = lstm_cpu.available_kernels(config.cell, config.rnn_units, config.precision == "mixed_bfloat16",
                                             args.jit_compile)
        resolved = autotune.resolve(config, vocab_size, args.seq_length, kernels)  # as the train stage does
        print(f"precision {resolved.policy} ({resolved.why}); LSTM path {resolved.kernel} ({resolved.kernel_why})",
              flush=True)
        config = dataclasses.replace(config, precision=resolved.policy, lstm_kernel=resolved.kernel)
        configure_determinism(config)
        stateful = args.layout == "streams"
        def new_model(stateful_batch=None, precision=None):
            model = model_from_config(vocab_size, config, precision=precision, stateful_batch=stateful_batch)
            lstm_cpu.install_model(model, kernel=config.lstm_kernel, weight_drop=config.weight_drop)  # as the train stage
            return model

        learning_rate, total_steps = config.learning_rate, None
        if args.schedule == "pipeline" and config.lr_decay_fraction > 0:
            # The pipeline's schedule is laid out over steps: estimate how many the budget allows.
            calibration = new_model(config.batch_size if stateful else None)
            compile_model(calibration, config.learning_rate, config.clipnorm, jit_compile=args.jit_compile,
                          weight_decay=config.weight_decay)
            probe_data = training_dataset(train_shards, args.seq_length, 0, batch_size=config.batch_size,
                                          shuffle_buffer=config.shuffle_buffer, seed=config.seed)
            # One fit, each step timed: a second fit would refill the shuffle buffer inside the timing
            # (that once made a run measure 3.9 steps/s for 6.4 and decay its rate 40% too early).
            timer = StepTimer()
            calibration.fit(probe_data, epochs=1, steps_per_epoch=args.calibration_steps + 5, verbose=0,
                            callbacks=[timer])
            step_seconds = float(np.mean(timer.seconds[5:]))  # after tracing, warm-up and the buffer fill
            rate = 1.0 / step_seconds
            total_steps = int(rate * args.minutes * 60)
            learning_rate = learning_rate_schedule(config.learning_rate, total_steps, config.lr_decay_fraction,
                                                   config.lr_decay_shape, config.lr_decay_to)
            print(f"calibration: {rate:.2f} steps/s (mean of {args.calibration_steps} steps), so the schedule "
                  f"is laid out over {total_steps} steps", flush=True)
            configure_determinism(config)
        model = new_model(config.batch_size if stateful else None)
        compile_model(model, learning_rate, config.clipnorm, jit_compile=args.jit_compile,
                      weight_decay=config.weight_decay, ema_momentum=config.ema_momentum, beta_2=config.adam_beta_2,
                      ema_warmup=config.ema_warmup, weight_decay_on=config.weight_decay_on)
        stateless = new_model()
        compile_model(stateless, config.learning_rate)

        def scorer(trained):
            stateless.set_weights(trained.get_weights())
            return stateless

        val_ds = validation_dataset(val_paths, args.seq_length, 64, val_windows)
        budget = Budget(args.minutes * 60, args.report_every, val_ds.take(args.probe_batches), scorer, args)
        print(f"{model.count_params():,} parameters; {vectorized.train_chars:,} train / "
              f"{vectorized.val_chars:,} val chars; budget {args.minutes} min of training; "
              f"layout {args.layout}{f' (state reset {args.state_reset:g})' if args.state_reset else ''}, lr decay over the last {args.lr_decay_fraction:.0%}, XLA {'on' if args.jit_compile else 'off'}", flush=True)
        _, train_ids, _ = load_ids(tmp / "vec")
        if stateful:
            data = stream_batches(train_ids, config.batch_size, args.seq_length)
        else:
            data = training_dataset(train_shards, args.seq_length, 0, batch_size=config.batch_size,
                                    shuffle_buffer=config.shuffle_buffer, seed=config.seed)
        start = time.perf_counter()
        # After the budget's: the resets' time counts as training time.
        resets = [StateResets(args.state_reset, config.seed)] if stateful and args.state_reset > 0 else []
        model.fit(data, epochs=1, steps_per_epoch=10**9, callbacks=[budget, *resets], verbose=0)
        wall = time.perf_counter() - start
        final = float(scorer(model).evaluate(val_ds, verbose=0))
        final_stream, _ = carried_state_loss(model, tmp / "seq", CARRIED_STREAMS)
        final_float32 = None
        if config.precision != "float32":
            reader = new_model(precision="float32")
            compile_model(reader, config.learning_rate)
            reader.set_weights(model.get_weights())
            final_float32 = float(reader.evaluate(val_ds, verbose=0))
    steps = model.optimizer.iterations.numpy().item()
    tokens = steps * config.batch_size * args.seq_length
    print(f"final val loss {final:.4f} nats/char ({final / math.log(2):.4f} bits/char) over the whole val split "
          f"after {budget.trained:.0f} s of training ({steps} steps, {tokens:,} tokens, "
          f"{tokens / budget.trained:,.0f} tokens/s)" + (f"; the schedule was laid out over {total_steps}" if total_steps else ""))
    print(f"final val loss with the state carried ({CARRIED_STREAMS} contiguous streams): {final_stream:.4f} nats/char "
          f"({final_stream / math.log(2):.4f} bits/char)")
    if final_float32 is not None:
        print(f"final val loss with the same weights read in float32: {final_float32:.4f} nats/char")
    print(json.dumps({"val_loss": round(final, 4), "val_bpc": round(final / math.log(2), 4),
                      "val_loss_stream": round(final_stream, 4),
                      "val_loss_float32": None if final_float32 is None else round(final_float32, 4),
                      "train_seconds": round(budget.trained, 1), "wall_seconds": round(wall, 1),
                      "steps": steps, "scheduled_steps": total_steps, "tokens": tokens, "series": budget.series,
                      "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"},
                      "seq_length": args.seq_length, "layout": args.layout, "state_reset": args.state_reset,
                      "warmup_seconds": args.warmup_seconds,
                      "schedule": args.schedule, "precision_why": resolved.why,
                      "lstm_kernel_why": resolved.kernel_why}))


if __name__ == "__main__":
    main()
