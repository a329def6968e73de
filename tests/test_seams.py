"""Canaries of the private seams (charrnn.seams): one per seam, each naming the library version it was
written against. Each fails, by name, when an upgrade moves an internal the package relies on, instead
of a fast path switching off or a resumed run drifting silently. Seconds in all."""

from __future__ import annotations

import ast
import http.server
import threading
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from charrnn import seams
from conftest import REPO


# ---- Keras 3.15.1 -------------------------------------------------------------------------------


def test_keras_lstm_call_goes_through_the_replaced_inner_loop():
    """Keras 3.15.1: ``LSTM.call`` calls the instance's ``inner_loop``; restoring gives Keras' own."""
    keras.utils.set_random_seed(1)
    layer = keras.layers.LSTM(8, return_sequences=True)
    x = tf.random.normal([2, 3, 4])
    stock = layer(x)
    calls = []
    original = seams.replace_lstm_inner_loop(layer, lambda *a, **k: calls.append(1) or original(*a, **k))
    np.testing.assert_array_equal(layer(x), stock)
    assert calls == [1], "keras.layers.LSTM.call no longer calls inner_loop: the fused LSTM is not used"
    seams.restore_lstm_inner_loop(layer)
    layer(x)
    assert calls == [1] and "inner_loop" not in layer.__dict__


def test_keras_compile_keeps_xla_only_for_layers_that_support_jit():
    """Keras 3.15.1: ``compile(jit_compile=True)`` reads every layer's ``supports_jit`` (the TensorFlow
    LSTM sets it False where cuDNN may run); True keeps XLA as for a model without an LSTM."""

    def jit_kept(layer) -> bool:
        model = keras.Sequential([keras.Input((3, 4)), layer])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras' "Model doesn't support `jit_compile=True`"
            model.compile(loss="mse", jit_compile=True)
        return bool(model.jit_compile)

    baseline = jit_kept(keras.layers.Dense(2))  # False only where op determinism is on
    layer = keras.layers.LSTM(8)
    seams.set_jit_compatible(layer, False)
    assert not seams.jit_compatible(layer)
    assert not jit_kept(layer), "Keras' compile no longer reads supports_jit"
    seams.set_jit_compatible(layer, True)
    assert seams.jit_compatible(layer) and jit_kept(layer) == baseline


def test_keras_optimizer_all_reduces_through_the_method_the_distributed_step_replaces():
    """Keras 3.15.1: ``apply`` sums the replicas' gradients in ``_all_reduce_sum_gradients`` (after the
    clip); the distributed step replaces it, as it hands over gradients already summed."""
    optimizer = keras.optimizers.AdamW(1e-3, clipnorm=1.0)
    variable = keras.Variable([1.0, 2.0])
    calls = []
    optimizer._all_reduce_sum_gradients = lambda pairs: calls.append(1) or list(pairs)
    optimizer.apply([tf.constant([0.5, 0.5])], [variable])
    assert calls == [1], "Keras' optimizer no longer all-reduces through _all_reduce_sum_gradients"
    summed = keras.optimizers.AdamW(1e-3, clipnorm=1.0)
    seams.declare_gradients_summed(summed)
    pairs = [(tf.constant([0.5]), variable)]
    assert summed._all_reduce_sum_gradients(pairs) == pairs


def test_keras_optimizer_updates_the_moving_average_through_the_hook_the_warmup_replaces():
    """Keras 3.15.1: with ``use_ema`` each ``apply`` updates ``_model_variables_moving_average`` in
    ``_update_model_variables_moving_average``; a momentum from ``moving_average_momentum`` replaces
    Keras' (here 0.25: the average, zeros before the first step, moves three quarters of the way to
    the new weights)."""

    class Fixed(seams.MovingAverageMomentum, keras.optimizers.SGD):
        def moving_average_momentum(self):
            return tf.constant(0.25)

    variable = keras.Variable([1.0, 2.0])
    optimizer = Fixed(1.0, use_ema=True, ema_momentum=0.9)
    optimizer.build([variable])
    optimizer.apply([tf.constant([1.0, 1.0])], [variable])  # variable -> [0, 1]
    (average,) = optimizer._model_variables_moving_average
    np.testing.assert_allclose(average.numpy(), [0.0, 0.75])


def test_dropout_masks_follow_the_seed_generator_state_and_the_layers_are_found():
    """Keras 3.15.1: a Dropout layer draws from ``seed_generator.state``; putting the state back replays
    the same masks. ``random_layers`` finds the Dropout layers of nested models through the public
    ``layers``; Keras' private ``_flatten_layers`` finds the same ones plus the RNN cells."""
    from charrnn.model import build_model

    model = build_model(11, embedding_dim=4, rnn_units=8, num_layers=2, dropout=0.5, cell="lstm",
                        input_dropout=0.1)
    found = seams.random_layers(model)
    assert sorted(found) == ["dropout_0", "dropout_1", "input_dropout", "lstm_0/cell", "lstm_1/cell"]
    assert found["lstm_1/cell"] is model.get_layer("lstm_1").cell
    assert seams.cell_seed_generator(model.get_layer("lstm_1")) is found["lstm_1/cell"].seed_generator
    private = {layer.name for layer in model._flatten_layers(include_self=False)
               if getattr(layer, "seed_generator", None) is not None}
    assert private - set(found) == {"lstm_cell"}  # the cells, found above under their layer's name
    nested = keras.Sequential([keras.Input((4,)), keras.Sequential([keras.layers.Dropout(0.5, name="inner")])])
    assert list(seams.random_layers(nested)) == ["inner"]

    layer = found["dropout_0"]
    x = tf.ones([4, 16])
    before = seams.seed_state(layer)
    first = layer(x, training=True)
    assert seams.seed_state(layer) != before, "Dropout no longer advances seed_generator.state"
    seams.set_seed_state(layer, before)
    np.testing.assert_array_equal(layer(x, training=True), first)


# ---- TensorFlow 2.21.0 --------------------------------------------------------------------------


def test_xla_tracing_is_detected():
    """TensorFlow 2.21.0: ``control_flow_util.GraphOrParentsInXlaContext`` tells an XLA trace from a
    plain one; when it moves the seam answers True everywhere (TensorFlow's ops, slower)."""
    probe = lambda: tf.constant(seams.in_xla_context())  # noqa: E731
    assert not seams.in_xla_context()
    assert not bool(tf.function(probe)())
    assert bool(tf.function(probe, jit_compile=True)())


# ---- MLflow 3.17.2 ------------------------------------------------------------------------------


class Answer503(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        Answer503.seen.append(self.headers.get("Authorization"))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_mlflow_requests_go_once_with_the_clients_credentials(monkeypatch):
    """MLflow 3.17.2: ``http_request`` with ``get_default_host_creds`` sends MLflow's credentials, no
    retry with ``max_retries=0`` (even on a 503, a code MLflow retries), the answer whatever its status."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "canary-token")
    try:
        Answer503.seen = []
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert seams.ask_tracking_server(uri, "/health", "GET", 5).status_code == 503
        assert Answer503.seen == ["Bearer canary-token"]
    finally:
        server.shutdown()
        server.server_close()


def test_mlflow_search_experiments_endpoint():
    """MLflow 3.17.2: ``extract_api_info_for_service`` with ``_REST_API_PATH_PREFIX``."""
    assert seams.search_experiments_endpoint() == ("/api/2.0/mlflow/experiments/search", "POST")


def test_mlflow_client_credentials_come_from_the_variables(monkeypatch):
    """MLflow 3.17.2: ``read_mlflow_creds`` reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    creds = seams.client_credentials()
    assert (creds.username, creds.password) == ("alice", "secret")


def test_mlflow_keeps_a_system_metrics_monitor_per_run(tmp_path):
    """MLflow 3.17.2: ``start_run(log_system_metrics=True)`` files its monitor under the run id in
    ``fluent.run_id_to_system_metrics_monitor``, where a run ended without its server is found."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run(log_system_metrics=True) as run:
            monitor = seams.pop_system_metrics_monitor(run.info.run_id)
            assert monitor is not None and callable(monitor.finish), "no monitor filed under the run id"
            monitor.finish()
        assert seams.pop_system_metrics_monitor(run.info.run_id) is None
    finally:
        mlflow.set_tracking_uri(previous)


def test_mlflow_leaves_predict_unwrapped_for_a_model_with_a_signature():
    """MLflow 3.17.2: ``PythonModel.__init_subclass__`` wraps ``predict`` (and warns that it has no type
    hints) unless the class has ``_skip_type_hint_validation``."""
    import mlflow

    from charrnn.served_model import TextGenerator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class Plain(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input

        class WithSignature(seams.python_model_without_type_hints()):
            def predict(self, context, model_input, params=None):
                return model_input

    assert getattr(Plain.__dict__["predict"], "_is_pyfunc", False), "MLflow no longer wraps predict"
    assert sum("type hints" in str(w.message) for w in caught) == 1
    for cls in (WithSignature, TextGenerator):
        assert not getattr(cls.__dict__["predict"], "_is_pyfunc", False), cls


# ---- no other module touches them ---------------------------------------------------------------

PRIVATE_NAMES = {"_all_reduce_sum_gradients", "_flatten_layers", "seed_generator", "_model_variables_moving_average",
                 "_update_model_variables_moving_average", "supports_jit", "inner_loop",
                 "run_id_to_system_metrics_monitor", "_skip_type_hint_validation", "_REST_API_PATH_PREFIX",
                 "extract_api_info_for_service", "http_request", "read_mlflow_creds", "get_default_host_creds"}
PRIVATE_MODULES = ("tensorflow.python", "keras.src", "mlflow.utils", "mlflow.tracking.fluent", "mlflow.protos")


@pytest.mark.parametrize("path", sorted((REPO / "src" / "charrnn").glob("*.py")), ids=lambda p: p.name)
def test_only_the_seams_module_touches_the_internals(path):
    """An attribute, a name in ``getattr``, or an import of a private module, anywhere but seams.py."""
    if path.name == "seams.py":
        return
    touched = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            touched.add(node.attr)
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES:
            touched.add(node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            touched |= {m for m in modules if m.startswith(PRIVATE_MODULES)}
            touched |= {a.name for a in node.names if a.name in PRIVATE_NAMES}
    assert not touched, f"{path.name} touches {sorted(touched)}: go through charrnn.seams"
