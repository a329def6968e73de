"""The fused CPU LSTM (charrnn.lstm_cpu) against Keras' own LSTM: values, gradients, saving,
fallbacks, mixed precision, XLA and determinism. Small shapes: a few seconds each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from charrnn import cell_ops, lstm_cpu

# The fused kernel sums the same terms in another order (input projection of all steps first):
# float32 round-off only, measured ~1e-7 relative on these shapes. A wrong gate, transpose or
# missing term gives errors of order 1e-1, so 1e-5 separates the two by orders of magnitude.
RTOL = 1e-5


def missing_prerequisite(what: str):
    from conftest import missing_prerequisite  # not at import: subprocesses import this module outside pytest

    missing_prerequisite(what)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def randomize(layer, rng) -> None:
    """Weights of a scale that keeps every gate away from saturation, bias included."""
    layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()])


def lstm_pair(units, n_in, rng, **kwargs):
    """Two built LSTMs with the same random weights: Keras' own, and one with the fused kernel."""
    stock = keras.layers.LSTM(units, return_sequences=True, return_state=True, **kwargs)
    fused = keras.layers.LSTM(units, return_sequences=True, return_state=True, **kwargs)
    for layer in (stock, fused):
        layer.build((None, None, n_in))
    randomize(stock, rng)
    fused.set_weights(stock.get_weights())
    assert lstm_cpu.install(fused)
    return stock, fused


def run_stack(layers, x, states):
    """Apply LSTM layers in sequence; returns every layer's (outputs, h, c), flattened."""
    results = []
    for layer, (h0, c0) in zip(layers, states):
        out, h, c = layer(x, initial_state=[h0, c0])
        results += [out, h, c]
        x = out
    return results


def make_case(units_list, n_in, batch=3, steps=7, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    width = n_in
    for units in units_list:
        pairs.append(lstm_pair(units, width, rng))
        width = units
    x = tf.constant(rng.normal(0, 1, (batch, steps, n_in)).astype(np.float32))
    states = [(tf.constant(rng.normal(0, 0.5, (batch, u)).astype(np.float32)),
               tf.constant(rng.normal(0, 0.5, (batch, u)).astype(np.float32)))
              for u in units_list]
    return [p[0] for p in pairs], [p[1] for p in pairs], x, states, rng


CASES = [([32], 5), ([96], 16), ([128], 8), ([64, 32], 7), ([48, 128], 12)]


@pytest.mark.parametrize("units_list,n_in", CASES)
def test_forward_matches_keras(units_list, n_in):
    stock, fused, x, states, _ = make_case(units_list, n_in)
    expected = run_stack(stock, x, states)
    got = run_stack(fused, x, states)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert rel_err(g, e) < RTOL
    # Traced (as model.fit runs it) too.
    graph = tf.function(lambda: run_stack(fused, x, states))()
    for e, g in zip(expected, graph):
        assert rel_err(g, e) < RTOL


def test_tolerance_can_fail():
    """The comparison is sharp enough to see a small error: a recurrent kernel off by 0.1%."""
    stock, fused, x, states, _ = make_case([32], 5)
    expected = run_stack(stock, x, states)
    w = fused[0].get_weights()
    fused[0].set_weights([w[0], w[1] * 1.001, w[2]])
    got = run_stack(fused, x, states)
    assert rel_err(got[0], expected[0]) > 10 * RTOL


def gradients(layers, x, states, weights):
    """d(loss)/d(inputs, initial states, every kernel, recurrent kernel and bias)."""
    variables = [v for layer in layers for v in layer.trainable_weights]
    flat_states = [s for pair in states for s in pair]
    with tf.GradientTape() as tape:
        tape.watch([x] + flat_states)
        results = run_stack(layers, x, states)
        # Weighted so that every output (all hidden states, last h, last c) carries gradient.
        loss = tf.add_n([tf.reduce_sum(r * w) for r, w in zip(results, weights)])
    return tape.gradient(loss, [x] + flat_states + variables)


@pytest.mark.parametrize("units_list,n_in", CASES)
def test_gradients_match_autodiff(units_list, n_in):
    stock, fused, x, states, rng = make_case(units_list, n_in)
    shapes = [r.shape for r in run_stack(stock, x, states)]
    weights = [tf.constant(rng.normal(0, 1, s).astype(np.float32)) for s in shapes]
    expected = gradients(stock, x, states, weights)
    got = gradients(fused, x, states, weights)
    assert len(got) == 1 + 2 * len(units_list) + 3 * len(units_list)
    for e, g in zip(expected, got):
        assert g is not None and g.shape == e.shape
        assert rel_err(g, e) < RTOL
    traced = tf.function(lambda: gradients(fused, x, states, weights))()
    for e, g in zip(expected, traced):
        assert rel_err(g, e) < RTOL


def test_only_last_output_used():
    """return_sequences=False and zero initial state (the layer's own), gradient through h only."""
    rng = np.random.default_rng(3)
    stock = keras.layers.LSTM(40)
    fused = keras.layers.LSTM(40)
    for layer in (stock, fused):
        layer.build((None, None, 6))
    randomize(stock, rng)
    fused.set_weights(stock.get_weights())
    lstm_cpu.install(fused)
    x = tf.constant(rng.normal(0, 1, (2, 9, 6)).astype(np.float32))

    def grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.range(40, dtype=tf.float32))
        return [y] + tape.gradient(loss, [x] + layer.trainable_weights)

    for e, g in zip(grads(stock), grads(fused)):
        assert rel_err(g, e) < RTOL


def build_char_model(units=24, layers=2, dtype=None):
    ids = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(30, 8, dtype=dtype)(ids)
    for i in range(layers):
        x = keras.layers.LSTM(units, return_sequences=True, name=f"lstm_{i}", dtype=dtype)(x)
    logits = keras.layers.Dense(30, dtype="float32")(x)
    return keras.Model(ids, logits)


def test_save_and_load_as_plain_keras(tmp_path):
    keras.utils.set_random_seed(1)
    model = build_char_model()
    config_before = model.get_config()
    assert lstm_cpu.install_model(model) == 2
    assert model.get_config() == config_before
    ids = np.random.default_rng(0).integers(0, 30, (4, 11)).astype(np.int32)
    fused_out = model.predict(ids, verbose=0)

    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json"))
    lstm_configs = [layer for layer in saved["config"]["layers"] if layer["class_name"] == "LSTM"]
    assert len(lstm_configs) == 2
    assert all(layer["module"] == "keras.layers" for layer in lstm_configs)

    loaded = keras.models.load_model(path, safe_mode=True)
    loaded_lstms = [layer for layer in loaded.layers if isinstance(layer, keras.layers.LSTM)]
    assert [type(layer) for layer in loaded_lstms] == [keras.layers.LSTM] * 2
    assert not any(lstm_cpu.is_installed(layer) for layer in loaded_lstms)
    for layer in loaded_lstms:
        assert layer.get_config() == model.get_layer(layer.name).get_config()
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Keras' own LSTM in the loaded model: the same function.
    assert rel_err(loaded.predict(ids, verbose=0), fused_out) < RTOL
    # install_model drops the predict function traced with Keras' path: now the fused kernel
    # runs in the loaded model, and gives the very same numbers as in the saved one.
    assert lstm_cpu.install_model(loaded) == 2
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), fused_out)
    fresh = keras.models.load_model(path, safe_mode=True)
    lstm_cpu.install_model(fresh)
    np.testing.assert_array_equal(fresh.predict(ids, verbose=0), fused_out)


def test_uninstall_restores_keras_path():
    keras.utils.set_random_seed(2)
    layer = keras.layers.LSTM(16, return_sequences=True)
    x = tf.random.normal([2, 5, 3])
    stock = layer(x)
    supports_jit = layer.supports_jit
    lstm_cpu.install(layer)
    assert layer.supports_jit and lstm_cpu.is_installed(layer)
    lstm_cpu.uninstall(layer)
    assert layer.supports_jit == supports_jit and not lstm_cpu.is_installed(layer)
    np.testing.assert_array_equal(layer(x), stock)


@pytest.mark.parametrize("kwargs", [
    {"go_backwards": True}, {"activation": "relu"}, {"recurrent_activation": "tanh"},
    {"use_bias": False}, {"unroll": True}, {"dropout": 0.5},
])
def test_unsupported_configurations_fall_back(kwargs):
    keras.utils.set_random_seed(4)
    stock = keras.layers.LSTM(12, return_sequences=True, **kwargs)
    fused = keras.layers.LSTM(12, return_sequences=True, **kwargs)
    x = tf.random.normal([2, 5, 3])
    expected = stock(x)
    fused.build(x.shape)
    fused.set_weights(stock.get_weights())
    lstm_cpu.install(fused)
    assert not lstm_cpu.eligible(fused)
    np.testing.assert_array_equal(fused(x), expected)


def test_a_stateful_layer_carries_its_state_on_the_fused_kernel():
    """A stateful layer (the carried-state metric's, or training on contiguous streams) runs the
    fused kernel, continues each call from the state the last one left, as Keras' own does, and
    starts again from zeros after reset_states."""
    keras.utils.set_random_seed(6)
    stock = keras.layers.LSTM(32, return_sequences=True, stateful=True)
    fused = keras.layers.LSTM(32, return_sequences=True, stateful=True)
    x = tf.random.normal([3, 10, 5])
    first, second = x[:, :6], x[:, 6:]
    stock.build(first.shape)
    fused.build(first.shape)
    fused.set_weights(stock.get_weights())
    assert lstm_cpu.install(fused) and lstm_cpu.eligible(fused)
    for layer in (stock, fused):
        layer(first)
    expected, got = stock(second), fused(second)
    assert rel_err(got, expected) < RTOL
    for e, g in zip(stock.states, fused.states):
        assert rel_err(g, e) < RTOL
    # The second call continued the first: the same as one stateless call over the whole sequence.
    stateless = keras.layers.LSTM(32, return_sequences=True)
    stateless.build(x.shape)
    stateless.set_weights(stock.get_weights())
    assert rel_err(got, stateless(x)[:, 6:]) < RTOL
    fused.reset_states()
    assert rel_err(fused(first), stateless(first)) < RTOL


def test_mask_falls_back():
    keras.utils.set_random_seed(5)
    ids = tf.constant([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    embedding = keras.layers.Embedding(8, 4, mask_zero=True)
    stock = keras.layers.LSTM(10, return_sequences=True)
    fused = keras.layers.LSTM(10, return_sequences=True)
    x = embedding(ids)
    expected = stock(x, mask=embedding.compute_mask(ids))
    fused.build(x.shape)
    fused.set_weights(stock.get_weights())
    lstm_cpu.install(fused)
    np.testing.assert_array_equal(fused(x, mask=embedding.compute_mask(ids)), expected)


def test_not_installed_when_a_gpu_is_visible(monkeypatch):
    layer = keras.layers.LSTM(8)
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU" else [])
    assert lstm_cpu.install(layer) is False
    assert not lstm_cpu.is_installed(layer)
    assert "inner_loop" not in layer.__dict__


@pytest.mark.parametrize("policy,tol", [("mixed_bfloat16", 2e-2), ("mixed_float16", 3e-3)])
def test_mixed_precision(policy, tol):
    """Compute dtype 16-bit, float32 variables: same dtypes as Keras, values within 16-bit
    round-off, float32 gradients for the variables."""
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    stock = keras.layers.LSTM(32, return_sequences=True, dtype=policy)
    fused = keras.layers.LSTM(32, return_sequences=True, dtype=policy)
    x = tf.constant(rng.normal(0, 1, (3, 8, 5)).astype(np.float32))
    stock.build(x.shape)
    fused.build(x.shape)
    randomize(stock, rng)
    fused.set_weights(stock.get_weights())
    lstm_cpu.install(fused)

    def run(layer):
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        return y, tape.gradient(loss, layer.trainable_weights)

    (y_stock, g_stock), (y_fused, g_fused) = run(stock), run(fused)
    assert y_fused.dtype == y_stock.dtype == tf.as_dtype(policy.split("_")[1])
    assert rel_err(y_fused, y_stock) < tol
    for e, g in zip(g_stock, g_fused):
        assert g.dtype == tf.float32
        assert rel_err(g, e) < 5 * tol


def _train_script(jit_compile: bool) -> str:
    return textwrap.dedent(f"""
        import hashlib, os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import keras, numpy as np, tensorflow as tf
        from charrnn import lstm_cpu
        if not {jit_compile}:  # Keras turns XLA off when op determinism is on
            tf.config.experimental.enable_op_determinism()

        def train():
            keras.utils.set_random_seed(0)
            ids = keras.Input(shape=(None,), dtype="int32")
            x = keras.layers.Embedding(20, 8)(ids)
            x = keras.layers.LSTM(32, return_sequences=True)(x)
            x = keras.layers.LSTM(24, return_sequences=True)(x)
            model = keras.Model(ids, keras.layers.Dense(20)(x))
            assert lstm_cpu.install_model(model) == 2
            model.compile(optimizer=keras.optimizers.Adam(1e-2),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile={jit_compile})
            assert model.jit_compile == {jit_compile}
            data = np.random.default_rng(0).integers(0, 20, (8, 13)).astype(np.int32)
            before = [w.copy() for w in model.get_weights()]
            model.fit(data, np.roll(data, -1, 1), batch_size=4, epochs=1, shuffle=False, verbose=0)
            after = model.get_weights()
            assert all(np.isfinite(w).all() for w in after)
            assert not any(np.array_equal(a, b) for a, b in zip(before, after))
            return after

        runs = [train(), train()]
        digest = lambda ws: hashlib.sha256(b"".join(w.tobytes() for w in ws)).hexdigest()
        print(digest(runs[0]), digest(runs[1]))
        np.save("weights.npy", np.concatenate([w.ravel() for w in runs[0]]))
    """)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two-step training runs (each twice, in a child process: op determinism is process-wide)."""
    out = {}
    for jit in (False, True):
        folder = tmp_path_factory.mktemp(f"jit{jit}")
        proc = subprocess.run([sys.executable, "-c", _train_script(jit)], cwd=folder,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[jit] = (proc.stdout.split()[-2:], np.load(folder / "weights.npy"))
    return out


def test_training_is_bit_identical_on_rerun(trained):
    (first, second), _ = trained[False]
    assert first == second


def test_xla_training(trained):
    """jit_compile=True stays on with the fused layers (Keras' LSTM turns it off), reruns are
    bit-identical (XLA on CPU, without op determinism, which Keras does not combine with XLA),
    and it trains to the same weights as the graph path up to round-off."""
    (first, second), weights_xla = trained[True]
    assert first == second
    assert rel_err(weights_xla, trained[False][1]) < RTOL


def test_bfloat16_keeps_the_state_in_float32():
    """Under mixed_bfloat16 the fused layer multiplies in bfloat16 but carries the cell state and
    computes the gates in float32: over 200 steps it stays about twice as close to the float32
    layer as Keras' all-bfloat16 LSTM (measured 0.50-0.59 of its error; an all-bfloat16 kernel
    scores 1.0), although both round their outputs to bfloat16."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0, 1, (4, 200, 8)).astype(np.float32))
    reference = keras.layers.LSTM(64, return_sequences=True, return_state=True)
    stock = keras.layers.LSTM(64, return_sequences=True, return_state=True, dtype="mixed_bfloat16")
    fused = keras.layers.LSTM(64, return_sequences=True, return_state=True, dtype="mixed_bfloat16")
    for layer in (reference, stock, fused):
        layer.build(x.shape)
    reference.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in reference.get_weights()])
    stock.set_weights(reference.get_weights())
    fused.set_weights(reference.get_weights())
    lstm_cpu.install(fused)
    expected, got_stock, got_fused = reference(x), stock(x), fused(x)
    assert [t.dtype for t in got_fused] == [tf.bfloat16] * 3  # the compute dtype, as Keras returns
    for i in (0, 2):  # outputs, cell state
        assert rel_err(got_fused[i], expected[i]) < 0.7 * rel_err(got_stock[i], expected[i])


# ---- the compiled cell ops (charrnn.cell_ops) ---------------------------------------------------

def fit_graph_ops(model, x, y) -> set:
    """The op types in the graphs ``model.fit`` traced and ran (TensorFlow's graph trace, public API)."""
    import tempfile

    folder = tempfile.mkdtemp()
    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        tf.summary.trace_on(graph=True, profiler=False)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        tf.summary.trace_export("fit", step=0)
    writer.close()
    ops = set()
    for path in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, path)):
            for value in event.summary.value:
                metadata = tf.compat.v1.RunMetadata()
                metadata.ParseFromString(value.tensor.string_val[0])
                for graph in (g.pre_optimization_graph for g in metadata.function_graphs):
                    ops |= {node.op for node in graph.node}
                    ops |= {node.op for function in graph.library.function for node in function.node_def}
    shutil.rmtree(folder)
    return ops


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_the_compiled_ops_are_in_fits_train_step(precision):
    """Where a compiler is installed, ``fit()``'s traced train step runs the compiled whole-sequence
    ops (both directions), not a TensorFlow loop."""
    from charrnn.model import build_model

    if shutil.which(os.environ.get("CXX") or "g++") is None:
        missing_prerequisite("no C++ compiler here: TensorFlow's ops run (tested above)")
    assert cell_ops.load() is not None, "a compiler is installed but the ops did not build: see stderr"
    if precision == "mixed_bfloat16" and not cell_ops.runs_sequence(cell_ops.load(), tf.bfloat16):
        pytest.skip("this build has no bfloat16 sequence kernels (no AVX512-BF16)")
    model = build_model(11, embedding_dim=4, rnn_units=16, num_layers=1, dropout=0.0, cell="lstm", precision=precision)
    assert lstm_cpu.install_model(model) == 1
    from charrnn.optimizer import compile_model as compile_
    compile_(model, 1e-2)
    ids = np.random.default_rng(0).integers(0, 11, (8, 10)).astype("int32")
    ops = fit_graph_ops(model, ids, ids)
    assert {"CharrnnLstmSequenceForward", "CharrnnLstmSequenceBackward"} <= ops, sorted(ops)
    assert "While" not in ops and "StatelessWhile" not in ops  # no per-step loop left
    lstm_cpu.uninstall(model.layers[2])  # the check can fail: Keras' own layer has no such op
    model.train_function = None
    assert "CharrnnLstmSequenceForward" not in fit_graph_ops(model, ids, ids)
