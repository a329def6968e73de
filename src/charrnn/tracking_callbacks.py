"""Keras callbacks that record a training run in MLflow while it trains.

The x axis of every curve is the number of characters trained on so far (optimizer steps x batch
size x sequence length), so runs with different batch sizes or epoch lengths line up in the UI.
A resumed run skips the steps the MLflow run already holds: no metric gets two points at one step.

Error policy, the same for every callback here (implemented once, in ``TrackingCallback``): a failed
MLflow call never stops the training where it stands.

* The tracking server is gone (it no longer answers ``/health``): that is remembered, the epoch runs
  to its end and commits its checkpoint, and the next epoch start (or the end of training) raises the
  one-line error naming the fix: restart the server, rerun to resume from that checkpoint. The stage
  then ends the run without waiting for MLflow's retries (``tracking_outage``).
* Any other failure (the server or the local store answers; the call itself failed): one
  ``warning:`` line on stderr naming what was not logged and why; training goes on and the run lacks
  that point, parameter or sample.

Only the MLflow calls are covered: an error in the callbacks' own code stops the training like any
other bug. Metrics are sent asynchronously, so a failed batch of them is reported by MLflow's own
error line; the sample logged at each epoch's end is sent at once and finds a server that is gone.
"""

from __future__ import annotations

import sys
import time

import keras
import mlflow

from charrnn import tracking_outage
from charrnn.sampling import SamplingOptions
from charrnn.vocabulary import Vocabulary
from charrnn.errors import first_line

# The short sample logged after every epoch (samples/epoch_NNN.txt): characters after the prime,
# temperature and seed. Fixed so that epochs and runs compare.
EPOCH_SAMPLE_LENGTH = 300
EPOCH_SAMPLE_TEMPERATURE = 0.8
EPOCH_SAMPLE_SEED = 0


def optimizer_params(optimizer) -> dict:
    """The optimizer's config as MLflow params (``optimizer_<key>``), numbers where the UI plots
    them: a learning-rate schedule is its peak, floor and decay fraction, not the repr of its config
    (which MLflow's own callback logs, one opaque category in the compare view)."""
    params = {}
    for key, value in optimizer.get_config().items():
        if key == "learning_rate" and isinstance(value, dict):  # charrnn.optimizer.CoolDown
            schedule = value.get("config", {})
            peak = schedule["peak"]
            params.update({"optimizer_learning_rate": peak,
                           "optimizer_learning_rate_floor": round(peak * schedule["final"], 12),
                           "optimizer_learning_rate_decay_fraction":
                               round(schedule["decay_steps"] / max(schedule["total_steps"], 1), 6),
                           "optimizer_learning_rate_schedule": f"{value.get('class_name', '?')} ({schedule['shape']})"})
        elif isinstance(value, dict):  # a wrapped optimizer (LossScaleOptimizer): its own numbers
            inner = optimizer_params(keras.optimizers.deserialize(value)) if "class_name" in value else {}
            params.update({f"optimizer_{key.removesuffix('_optimizer')}_{k.removeprefix('optimizer_')}": v
                           for k, v in inner.items()})
        else:
            params[f"optimizer_{key}"] = value
    return params


class TrackingCallback(keras.callbacks.Callback):
    """A callback that logs to MLflow under the module's error policy: its MLflow calls go through
    ``record``, and a tracking server found gone stops the training at the next epoch start."""

    def on_epoch_begin(self, epoch, logs=None):
        tracking_outage.raise_if_server_down()  # found at the last epoch's end, after that epoch's checkpoint

    def on_train_end(self, logs=None):
        tracking_outage.raise_if_server_down()

    def record(self, what: str, call, *args, **kwargs) -> bool:
        """``call(*args, **kwargs)``, an MLflow call that logs ``what``; False if it failed."""
        try:
            call(*args, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001 - the module's error policy
            if not tracking_outage.logging_failed(err):
                first = first_line(err, "")
                print(f"warning: MLflow: {what} not logged ({type(err).__name__}: {first[:300]}); "
                      "training goes on", file=sys.stderr, flush=True)
            return False


class TrainingCurves(TrackingCallback):
    """The training curves, logged against characters trained rather than batches.

    Every ``log_every_steps`` optimizer steps: ``loss`` (the mean training loss over those steps,
    not Keras' running mean since the epoch began), ``learning_rate`` and ``tokens_per_second``.
    At every epoch end: ``val_loss``, ``epoch_loss`` and ``epoch``. ``logged`` maps a metric to the
    last step the run already holds (after a resume). ``steps`` collects the logged windows'
    ``[chars, loss, learning_rate]`` (the checkpoint keeps them, the stage writes them for DVC plots).
    With ``log_model_info``, the optimizer's params and ``model_summary.txt`` once, as training begins.
    """

    def __init__(self, log_every_steps: int, chars_per_step: int, logged: dict[str, int] | None = None,
                 log_model_info: bool = True, steps: list | None = None):
        super().__init__()
        self.log_every_n_steps = log_every_steps
        self.chars_per_step = chars_per_step
        self.logged = dict(logged or {})
        self.log_model_info = log_model_info
        self.steps = steps if steps is not None else []  # [chars, loss, learning_rate] per window, kept

    def on_train_begin(self, logs=None):
        if self.log_model_info:  # optimizer params and model_summary.txt, once per run
            self.record("the optimizer's params", mlflow.log_params, optimizer_params(self.model.optimizer))
            lines = []
            self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
            self.record("model_summary.txt", mlflow.log_text, "\n".join(lines), artifact_file="model_summary.txt")

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
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
        values = {
            "loss": (total - total_before) / n,
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "tokens_per_second": n * self.chars_per_step / max(now - started, 1e-9),
        }
        self.steps.append([step * self.chars_per_step, values["loss"], values["learning_rate"]])
        self._log(values, step * self.chars_per_step)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        chars = int(self.model.optimizer.iterations.numpy()) * self.chars_per_step
        values = {"epoch": epoch + 1}
        if "loss" in logs:
            values["epoch_loss"] = float(logs["loss"])
        if "val_loss" in logs:
            values["val_loss"] = float(logs["val_loss"])
        self._log(values, chars)

    def _log(self, values: dict, step: int) -> None:
        fresh = {k: v for k, v in values.items() if step > self.logged.get(k, -1)}
        if fresh and self.record(f"metrics at step {step}", mlflow.log_metrics, fresh, step=step, synchronous=False):
            self.logged.update({k: step for k in fresh})


class EpochSamples(TrackingCallback):
    """A short sample after every epoch (fixed prime and seed), logged as ``samples/epoch_NNN.txt``,
    so one watches the text improve in the UI."""

    def __init__(self, vocabulary: Vocabulary, prime: str):
        super().__init__()
        self.vocabulary = vocabulary
        self.prime = prime
        self.options = SamplingOptions(length=EPOCH_SAMPLE_LENGTH, temperature=EPOCH_SAMPLE_TEMPERATURE,
                                       seed=EPOCH_SAMPLE_SEED)
        self.generator = None

    def on_epoch_end(self, epoch, logs=None):
        from charrnn.generate import Generator

        if self.generator is None:  # compiled once; each epoch loads the weights it reached
            self.generator = Generator(self.model, self.vocabulary)
        else:
            self.generator.refresh(self.model)
        (text,) = self.generator.generate(self.prime, self.options)
        header = f"# after epoch {epoch + 1}; temperature {self.options.temperature:g}, seed {self.options.seed}\n"
        name = f"samples/epoch_{epoch + 1:03d}.txt"
        self.record(name, mlflow.log_text, header + text + "\n", name)
