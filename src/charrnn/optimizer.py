"""The optimizer and the learning-rate schedule: Keras' Adam/AdamW with the pipeline's options
(a warmed-up moving average, decay of the kernels only) and the cool-down, compiled into a model.

Both are registered with Keras, so a checkpoint's optimizer (``charrnn.checkpoints``) reloads them."""

from __future__ import annotations

import math

import keras

from charrnn import seams


@keras.saving.register_keras_serializable(package="charrnn")
class CoolDown(keras.optimizers.schedules.LearningRateSchedule):
    """``peak`` for the first ``total_steps - decay_steps`` steps, then down to ``peak * final``, reached
    at step ``total_steps``: a cosine, a straight line, or ``1 - sqrt(progress)`` (most of the fall
    early, a long tail near the floor). Keras' ``CosineDecay`` has the cosine only, with its floor as ``alpha``.
    Keyed on the optimizer's step count, so a resumed run continues it; saved with the checkpoint's
    optimizer (registered, so ``safe_mode`` loads it)."""

    SHAPES = ("cosine", "linear", "sqrt")

    def __init__(self, peak: float, total_steps: int, decay_steps: int, final: float = 0.1, shape: str = "cosine"):
        if shape not in self.SHAPES:
            raise ValueError(f"shape must be one of {self.SHAPES}, not {shape!r}")
        self.peak, self.total_steps, self.decay_steps = float(peak), int(total_steps), max(int(decay_steps), 1)
        self.final, self.shape = float(final), shape

    def __call__(self, step):
        start = float(self.total_steps - self.decay_steps)
        progress = keras.ops.clip((keras.ops.cast(step, "float32") - start) / self.decay_steps, 0.0, 1.0)
        if self.shape == "cosine":
            remaining = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.shape == "linear":
            remaining = 1.0 - progress
        else:
            remaining = 1.0 - keras.ops.sqrt(progress)
        return self.peak * (self.final + (1.0 - self.final) * remaining)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "decay_steps": self.decay_steps,
                "final": self.final, "shape": self.shape}


def learning_rate_schedule(learning_rate: float, total_steps: int, decay_fraction: float = 0.0,
                           shape: str = "cosine", final: float = 0.1):
    """``learning_rate``, then a decay to ``learning_rate * final`` over the last ``decay_fraction``
    of ``total_steps`` (0 = constant): a ``CoolDown``. Short CPU runs learn fastest at the peak rate
    and gain from annealing only at the end (benchmarks/time_to_quality.py)."""
    if decay_fraction == 0:
        return learning_rate
    return CoolDown(learning_rate, total_steps, round(total_steps * decay_fraction), final, shape)


class _Options(seams.MovingAverageMomentum):
    """What the pipeline adds to Keras' Adam and AdamW, saved in their config so that a checkpoint's
    optimizer resumes with them:

    * ``ema_warmup``: the moving average's momentum is ``min(ema_momentum, (1+t)/(10+t))`` at the
      t-th step after the first (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``), so
      the average forgets the first steps' weights; Keras' own holds them with weight
      ``ema_momentum ** t``.
    * ``weight_decay_on="kernels"``: no decay of the biases (the forget gate's included) and the
      embeddings, only of the weight matrices named ``kernel``."""

    def __init__(self, *args, ema_warmup: bool = False, weight_decay_on: str = "all", **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_warmup, self.weight_decay_on = ema_warmup, weight_decay_on
        if weight_decay_on == "kernels":
            self.exclude_from_weight_decay(var_names=["bias", "embeddings"])

    def moving_average_momentum(self):
        if not self.ema_warmup:
            return None  # Keras' own
        step = keras.ops.cast(self.iterations, "float32")  # 0 at the first update: the average starts there
        return keras.ops.minimum(self.ema_momentum, step / (9.0 + step))

    def get_config(self):
        return {**super().get_config(), "ema_warmup": self.ema_warmup, "weight_decay_on": self.weight_decay_on}


@keras.saving.register_keras_serializable(package="charrnn")
class Adam(_Options, keras.optimizers.Adam):
    """Keras' Adam with the pipeline's options (``_Options``)."""


@keras.saving.register_keras_serializable(package="charrnn")
class AdamW(_Options, keras.optimizers.AdamW):
    """Keras' AdamW with the pipeline's options (``_Options``)."""


def compile_model(model: keras.Model, learning_rate, clipnorm: float | None = None,
                  jit_compile: bool = False, weight_decay: float = 0.0, ema_momentum: float | None = None,
                  *, beta_2: float = 0.999, ema_warmup: bool = False, weight_decay_on: str = "all") -> None:
    """Adam on the sparse cross-entropy of the logits; ``learning_rate`` is a float or a schedule.

    ``weight_decay`` > 0 makes it AdamW: every weight (``weight_decay_on="all"``, Keras' default) or
    only the kernels (``"kernels"``) shrinks by ``learning_rate * weight_decay`` of itself per step,
    apart from the gradient step.

    ``ema_momentum`` (None = off) keeps an exponential moving average of the weights in the optimizer
    (Keras' ``use_ema``; saved with it, so a resumed run continues the average), ``ema_warmup`` with
    a momentum that grows from 0 (``_Options``); ``fit`` ends by putting the average into the model:
    the saved model is the average (``finalize_ema``).

    Under ``mixed_float16`` the optimizer is a ``LossScaleOptimizer``: small float16 gradients would
    underflow to zero. Keras wraps it only when the *global* policy is mixed_float16; ours is set
    per layer (``build_model``), so it is wrapped here. bfloat16 has float32's range: no scaling.
    """
    kwargs = {"learning_rate": learning_rate, "clipnorm": clipnorm, "beta_2": beta_2}
    if ema_momentum:
        kwargs.update(use_ema=True, ema_momentum=ema_momentum)
    if weight_decay > 0:
        kwargs["weight_decay"] = weight_decay
    options = {"ema_warmup": True} if ema_warmup and ema_momentum else {}
    if weight_decay > 0 and weight_decay_on != "all":
        options["weight_decay_on"] = weight_decay_on
    # Keras' own classes where no option is on: their checkpoints load anywhere.
    if weight_decay > 0:
        optimizer = AdamW(**kwargs, **options) if options else keras.optimizers.AdamW(**kwargs)
    else:
        optimizer = Adam(**kwargs, **options) if options else keras.optimizers.Adam(**kwargs)
    if any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )


def compile_for_training(model: keras.Model, config, total_steps: int) -> None:
    """``compile_model`` with a ``TrainConfig``'s optimizer and schedule laid out over ``total_steps``."""
    schedule = learning_rate_schedule(config.learning_rate, total_steps, config.lr_decay_fraction,
                                      config.lr_decay_shape, config.lr_decay_to)
    compile_model(model, schedule, config.clipnorm, weight_decay=config.weight_decay, ema_momentum=config.ema_momentum,
                  beta_2=config.adam_beta_2, ema_warmup=config.ema_warmup, weight_decay_on=config.weight_decay_on)


def finalize_ema(model: keras.Model) -> None:
    """Put the optimizer's moving average of the weights into ``model`` (a no-op without one).
    ``fit`` does this when it returns; a run resumed after its last epoch never calls ``fit``, and the
    multi-worker loop is not ``fit``: both come here. Idempotent (the average is assigned, not mixed)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "use_ema", False) and optimizer.built:
        optimizer.finalize_variable_values(model.trainable_variables)
