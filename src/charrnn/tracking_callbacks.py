"""Keras callbacks that record a training run in MLflow while it trains.

The x axis of every curve is the number of characters trained on so far (optimizer steps x batch
size x sequence length), so runs with different batch sizes or epoch lengths line up in the UI.
A resumed run skips the steps the MLflow run already holds: no metric gets two points at one step.
"""

from __future__ import annotations

import time

import keras
import mlflow

from charrnn import tracking
from charrnn.config import EPOCH_SAMPLE_LENGTH, EPOCH_SAMPLE_SEED, EPOCH_SAMPLE_TEMPERATURE
from charrnn.sampling import SamplingOptions
from charrnn.vocabulary import Vocabulary


class TrainingCurves(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, logging against characters trained rather than batches.

    Every ``log_every_steps`` optimizer steps: ``loss`` (the mean training loss over those steps,
    not Keras' running mean since the epoch began), ``learning_rate`` and ``tokens_per_second``.
    At every epoch end: ``val_loss``, ``epoch_loss`` and ``epoch``. ``logged`` maps a metric to the
    last step the run already holds (after a resume).
    """

    def __init__(self, log_every_steps: int, chars_per_step: int, logged: dict[str, int] | None = None,
                 log_model_info: bool = True):
        super().__init__(log_every_epoch=False, log_every_n_steps=log_every_steps)
        keras.callbacks.Callback.__init__(self)  # MlflowCallback skips it
        self.chars_per_step = chars_per_step
        self.logged = dict(logged or {})
        self.log_model_info = log_model_info

    def on_train_begin(self, logs=None):
        if self.log_model_info:  # optimizer params and model_summary.txt, once per run
            super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._window = (0, 0.0, time.perf_counter())  # (batches, summed loss, start time) of the window

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "loss" not in logs:
            return
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.log_every_n_steps:
            return
        seen, total_before, started = self._window
        total = float(logs["loss"]) * (batch + 1)  # Keras reports the running mean since the epoch began
        now = time.perf_counter()
        n = batch + 1 - seen
        self._window = (batch + 1, total, now)
        self._log({
            "loss": (total - total_before) / n,
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "tokens_per_second": n * self.chars_per_step / max(now - started, 1e-9),
        }, step * self.chars_per_step)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        chars = int(self.model.optimizer.iterations.numpy()) * self.chars_per_step
        values = {"epoch": epoch + 1}
        if "loss" in logs:
            values["epoch_loss"] = float(logs["loss"])
        if "val_loss" in logs:
            values["val_loss"] = float(logs["val_loss"])
        self._log(values, chars)

    def on_test_end(self, logs=None):
        pass  # val_loss is logged at the epoch's end, at its step

    def _log(self, values: dict, step: int) -> None:
        fresh = {k: v for k, v in values.items() if step > self.logged.get(k, -1)}
        if fresh:
            mlflow.log_metrics(fresh, step=step, synchronous=False)
            self.logged.update({k: step for k in fresh})


class EpochSamples(keras.callbacks.Callback):
    """A short sample after every epoch (fixed prime and seed), logged as ``samples/epoch_NNN.txt``,
    so one watches the text improve in the UI."""

    def __init__(self, vocabulary: Vocabulary, prime: str):
        super().__init__()
        self.vocabulary = vocabulary
        self.prime = prime
        self.options = SamplingOptions(length=EPOCH_SAMPLE_LENGTH, temperature=EPOCH_SAMPLE_TEMPERATURE,
                                       seed=EPOCH_SAMPLE_SEED)
        self.generator = None

    # Not in TrainingCurves: MLflow's callback base class logs its methods' exceptions and goes on.
    def on_epoch_begin(self, epoch, logs=None):
        tracking.raise_if_server_down()  # found at the last epoch's end, after that epoch's checkpoint

    def on_train_end(self, logs=None):
        tracking.raise_if_server_down()

    def on_epoch_end(self, epoch, logs=None):
        from charrnn.generate import Generator

        if self.generator is None:  # compiled once; each epoch loads the weights it reached
            self.generator = Generator(self.model, self.vocabulary)
        else:
            self.generator.refresh(self.model)
        (text,) = self.generator.generate(self.prime, self.options)
        header = f"# after epoch {epoch + 1}; temperature {self.options.temperature:g}, seed {self.options.seed}\n"
        try:
            mlflow.log_text(header + text + "\n", f"samples/epoch_{epoch + 1:03d}.txt")
        except Exception as err:  # a server that is gone stops the training after this epoch's checkpoint
            tracking.logging_failed(err)
