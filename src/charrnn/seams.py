"""Every private seam: the Keras, TensorFlow and MLflow internals this package relies on.

The public APIs do not offer these; each function below wraps one internal, names the version it was
written against (those pinned in pyproject.toml) and what breaks when a release moves it.
tests/test_seams.py holds one canary per seam, so an upgrade that moves one fails there, by name,
instead of a fast path switching off silently. No other module touches these internals.

Imports are inside the functions: the tracking preflight calls some of them before TensorFlow loads.
"""

from __future__ import annotations

import functools

# ---- Keras 3.15.1 -------------------------------------------------------------------------------


def replace_lstm_inner_loop(layer, fn):
    """Route ``layer``'s recurrence through ``fn(sequences, initial_state, mask, training=False)``
    (returning ``(last_output, outputs, states)``); returns Keras' own bound ``inner_loop``.

    Keras 3.15.1: ``LSTM.call`` goes through ``self.inner_loop`` (its cuDNN-or-loop dispatch), so an
    instance attribute overrides it and the model still saves as a plain ``keras.layers.LSTM``. If a
    release stops calling it, the fused CPU LSTM silently stops running: training falls back to
    Keras' loop (several times slower, the same model within float32 round-off).
    """
    original = layer.inner_loop
    object.__setattr__(layer, "inner_loop", fn)  # past Layer.__setattr__: a function, not tracked state
    return original


def restore_lstm_inner_loop(layer) -> None:
    """Undo :func:`replace_lstm_inner_loop`: the class's ``inner_loop`` again."""
    layer.__dict__.pop("inner_loop", None)


def jit_compatible(layer) -> bool:
    """Whether Keras lets ``compile(jit_compile=True)`` keep XLA for a model holding ``layer``."""
    return bool(layer.supports_jit)


def set_jit_compatible(layer, value: bool) -> None:
    """Keras 3.15.1: ``compile(jit_compile=True)`` keeps XLA only if every layer's ``supports_jit``
    is true, and the TensorFlow LSTM sets it False where cuDNN may run (a GPU: cuDNN cannot be
    compiled; the fused kernel, installed there with ``force``, can). If the attribute moves, such a
    layer turns ``jit_compile`` off with Keras' warning ("Model doesn't support `jit_compile=True`")."""
    object.__setattr__(layer, "supports_jit", value)


def declare_gradients_summed(optimizer) -> None:
    """Tell ``optimizer`` that the gradients it is given are already summed over the replicas.

    Keras 3.15.1: under a strategy ``BaseOptimizer.apply`` clips (``clipnorm``) and then sums the
    replicas' gradients in ``_all_reduce_sum_gradients``; the distributed step sums them first itself
    (global clipping), so that method becomes the identity. If it moves, this raises at the first
    distributed step instead of summing the summed gradients again after each replica's clip.
    """
    if not callable(getattr(type(optimizer), "_all_reduce_sum_gradients", None)):
        import keras

        raise RuntimeError(f"Keras {keras.__version__}'s optimizer no longer sums gradients in "
                           "_all_reduce_sum_gradients, which the strategy loop replaces: install the "
                           "Keras version of pyproject.toml")
    optimizer._all_reduce_sum_gradients = list


def random_layers(model) -> dict:
    """``{name: layer}`` for the layers of ``model`` (nested models too) that draw random numbers.

    Keras 3.15.1: a ``Dropout`` layer draws its masks from its attribute ``seed_generator``. The
    layers come from the public ``layers``, recursively; Keras' private ``_flatten_layers`` also
    yields each RNN's cell (all named ``lstm_cell``); the cells are found here through their layer's
    ``cell`` attribute, named ``<layer>/cell``: the weight drop of :mod:`charrnn.lstm_cpu` draws
    from their generators. If an attribute is renamed, no layer is found and a resumed run drops
    other units than the uninterrupted one (other bytes).
    """
    def walk(parent):
        for layer in parent.layers:
            yield layer
            if hasattr(layer, "layers"):
                yield from walk(layer)

    found = {layer.name: layer for layer in walk(model) if getattr(layer, "seed_generator", None) is not None}
    # An LSTM's weight drop (charrnn.lstm_cpu) draws from its cell's generator.
    found.update({f"{layer.name}/cell": layer.cell for layer in walk(model)
                  if getattr(getattr(layer, "cell", None), "seed_generator", None) is not None})
    return found


def cell_seed_generator(layer):
    """The seed generator of an RNN layer's cell (Keras 3.15.1's ``cell.seed_generator``, which the
    cell's own dropout would draw from): the weight drop's masks come from it, and
    :func:`random_layers` finds it, so a checkpoint keeps its state."""
    return layer.cell.seed_generator


class MovingAverageMomentum:
    """An optimizer mixin: the moving average of the weights (``use_ema``) updated with the momentum
    ``self.moving_average_momentum()`` returns (a tensor), or Keras' own where it returns None.

    Keras 3.15.1 updates the average in ``_update_model_variables_moving_average`` from the list
    ``_model_variables_moving_average``, with ``ema_momentum`` (0 at the first step);
    tests/test_seams.py checks both names."""

    def moving_average_momentum(self):
        return None

    def _update_model_variables_moving_average(self, trainable_variables):
        momentum = self.moving_average_momentum() if self.use_ema else None
        if momentum is None:
            return super()._update_model_variables_moving_average(trainable_variables)
        import keras

        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                m = keras.ops.cast(momentum, var.dtype)
                average.assign(m * average + (1 - m) * var)


def seed_state(layer) -> list:
    """Where ``layer``'s random stream stands: Keras 3.15.1's ``seed_generator.state``, a variable
    that the model file does not hold (so the checkpoint keeps it)."""
    return layer.seed_generator.state.numpy().tolist()


def set_seed_state(layer, values: list) -> None:
    """Put ``layer``'s random stream back where :func:`seed_state` found it."""
    layer.seed_generator.state.assign(values)


# ---- TensorFlow 2.21.0 --------------------------------------------------------------------------


def in_xla_context() -> bool:
    """Whether the graph being built will be compiled by XLA (``jit_compile``), where custom ops can't run.

    TensorFlow 2.21.0: ``tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext``, no
    public equivalent. If it moves this answers True ("cannot tell"), and the fused LSTM runs on
    TensorFlow's ops everywhere (correct, slower).
    """
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return True  # TensorFlow's own ops are safe either way


# ---- MLflow 3.17.2 ------------------------------------------------------------------------------


def ask_tracking_server(uri: str, endpoint: str, method: str, timeout: float, **kwargs):
    """One request to the tracking server ``uri`` as MLflow's client sends it (credentials, TLS
    settings, headers), without retries; returns the response whatever its status.

    MLflow 3.17.2: ``mlflow.utils.rest_utils.http_request`` with ``get_default_host_creds(uri)``, what
    the REST store sends through. If either moves, every preflight of a tracking server fails with a
    misleading "cannot be used" line naming the MLFLOW_TRACKING_* variables.
    """
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, method, max_retries=0, timeout=timeout,
                        raise_on_status=False, **kwargs)


def search_experiments_endpoint() -> tuple[str, str]:
    """The path and HTTP method of the first question MLflow's client asks a server (search experiments).

    MLflow 3.17.2: ``mlflow.utils.rest_utils._REST_API_PATH_PREFIX`` and
    ``extract_api_info_for_service`` (``("/api/2.0/mlflow/experiments/search", "POST")``). If they
    move, the train and evaluate stages stop with an ImportError before any work.
    """
    from mlflow.protos.service_pb2 import MlflowService, SearchExperiments
    from mlflow.utils.rest_utils import _REST_API_PATH_PREFIX, extract_api_info_for_service

    return extract_api_info_for_service(MlflowService, _REST_API_PATH_PREFIX)[SearchExperiments]


def client_credentials():
    """The user and password MLflow's client sends (``.username``, ``.password``): the
    MLFLOW_TRACKING_USERNAME/PASSWORD variables, else ``~/.mlflow/credentials``.

    MLflow 3.17.2: ``mlflow.utils.credentials.read_mlflow_creds``. If it moves, a server's 401 or 403
    ends the preflight with a traceback instead of the line naming whom the server refused.
    """
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds()


def pop_system_metrics_monitor(run_id: str):
    """Take the run's system-metrics monitor off MLflow's books and return it (None if there is none).

    MLflow 3.17.2: ``mlflow.tracking.fluent.run_id_to_system_metrics_monitor``; ``end_run`` stops the
    monitor only after the server acknowledged the run's end, so with the server gone it is stopped
    here. If the dict moves this returns None: the monitor's thread keeps sending to the dead
    server, and its failures may print after the stage's one-line error.
    """
    from mlflow.tracking import fluent

    return getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)


@functools.cache
def python_model_without_type_hints():
    """A ``mlflow.pyfunc.PythonModel`` base whose subclasses' ``predict`` MLflow leaves unwrapped.

    MLflow 3.17.2: ``PythonModel.__init_subclass__`` wraps ``predict`` for type-hint validation unless
    the class has ``_skip_type_hint_validation``; a model with an explicit signature needs no hints.
    If the flag moves, importing the served model warns "Add type hints to the `predict` method" at
    every load (the signature still validates).
    """
    import mlflow

    class PythonModelWithSignature(mlflow.pyfunc.PythonModel):
        _skip_type_hint_validation = True

    return PythonModelWithSignature
