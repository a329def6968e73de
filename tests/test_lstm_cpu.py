"""The fused CPU LSTM (charrnn.lstm_cpu) against Keras' own LSTM: values, gradients, saving,
fallbacks, mixed precision, XLA and determinism. Small shapes: a few seconds each."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from charrnn import cell_ops, lstm_cpu, lstm_fused

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

@pytest.fixture
def compiled_ops():
    if cell_ops.load() is None:
        missing_prerequisite("the cell ops could not be built here (a C++ compiler; see the note on stderr)")


def lstm_args(rng, units=48, n_in=12, batch=13, steps=9):
    """fused_lstm's arguments (and weights for a loss over its three results). 48 units: a full
    and a half-width unit block in the sequence ops' backward pass; 13 rows: uneven row tiles."""
    args = [tf.constant(rng.normal(0, s, shape).astype(np.float32)) for s, shape in (
        (1, (batch, steps, n_in)), (0.5, (batch, units)), (0.5, (batch, units)),
        (0.3, (n_in, 4 * units)), (0.3, (units, 4 * units)), (0.3, (4 * units,)))]
    weights = [tf.constant(rng.normal(0, 1, s).astype(np.float32))
               for s in ((batch, steps, units), (batch, units), (batch, units))]
    return args, weights


def fused_values_and_gradients(args, weights, matmul_dtype, compiled):
    with tf.GradientTape() as tape:
        tape.watch(args)
        results = lstm_fused.fused_lstm(*args, matmul_dtype=matmul_dtype, compiled=compiled)
        if matmul_dtype is not None:  # as install() returns them: in the compute dtype
            results = [tf.cast(tf.cast(r, matmul_dtype), tf.float32) for r in results]
        loss = tf.add_n([tf.reduce_sum(r * w) for r, w in zip(results, weights)])
    return list(results) + tape.gradient(loss, args)


# Measured (float32): the cell ops 1e-7 to 3e-7 (vectorised sigmoid/tanh round differently), the
# sequence ops 2e-7 to 4e-7 (their own matmul also sums in another order). A wrong factor or a
# missed term: ~1e-1.
@pytest.mark.parametrize("compiled", ["cell", "sequence"])
def test_compiled_ops_match_tensorflow_ops(compiled_ops, compiled):
    """The compiled kernels (per step, and the whole sequence) compute what the loop's TensorFlow
    ops compute, in float32: outputs, states and every gradient."""
    args, weights = lstm_args(np.random.default_rng(5))
    expected = fused_values_and_gradients(args, weights, None, False)
    got = fused_values_and_gradients(args, weights, None, compiled)
    errors = [rel_err(g, e) for e, g in zip(expected, got)]
    print("relative errors:", ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < 1e-6
    assert max(errors) > 0, "both runs took the same path: nothing was compared"


# With bfloat16 matmuls every path is ~4e-3 to 6e-3 from float32 (bf16's own step is 4e-3), and the
# paths round differently (the sequence ops add h @ U to xz unrounded; TensorFlow's bf16 matmul
# rounds it first), so each is held to the accuracy of TensorFlow's own ops: measured over three
# seeds, every tensor's error at most 1.07x theirs (cell ops 1.00x-1.02x); a wrong term: ~20x.
# 13 rows: uneven row tiles; 32 rows x 64 units: the batch-multiple-of-16 shape the AMX tiles take
# where the CPU has them, the vector tiles' full row tiles elsewhere.
@pytest.mark.parametrize("compiled,batch,units", [("cell", 13, 48), ("sequence", 13, 48), ("sequence", 32, 64)])
def test_compiled_ops_with_bfloat16_matmuls_are_as_accurate_as_tensorflow_ops(compiled_ops, compiled, batch, units):
    if compiled == "sequence" and not cell_ops.runs_sequence(cell_ops.load(), tf.bfloat16):
        pytest.skip("this build has no bfloat16 sequence ops (no AVX512-BF16)")
    args, weights = lstm_args(np.random.default_rng(5), units=units, batch=batch)
    exact = fused_values_and_gradients(args, weights, None, False)
    tf_ops = fused_values_and_gradients(args, weights, tf.bfloat16, False)
    got = fused_values_and_gradients(args, weights, tf.bfloat16, compiled)
    ratios = [rel_err(g, e) / rel_err(t, e) for e, t, g in zip(exact, tf_ops, got)]
    print("error / TensorFlow ops' error:", ", ".join(f"{r:.3f}" for r in ratios))
    assert max(ratios) < 1.1
    assert any(rel_err(g, t) > 0 for t, g in zip(tf_ops, got)), "same path twice: nothing compared"


def has_amx() -> bool:
    return "amx_bf16" in open("/proc/cpuinfo").read()


def sequence_in_subprocess(tmp_path, args, weights, matmul_dtype, env=None, threads=None):
    """fused_lstm's values and gradients from the sequence ops in a fresh process (its own op
    settings: ``env``, ``threads`` intra-op threads), as a list of arrays."""
    np.savez(tmp_path / "args.npz", *[a.numpy() for a in args + weights])
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        if {threads!r} is not None:
            tf.config.threading.set_intra_op_parallelism_threads({threads!r})
        from tests.test_lstm_cpu import fused_values_and_gradients
        data = np.load({str(tmp_path / "args.npz")!r})
        arrays = [tf.constant(data[f"arr_{{i}}"]) for i in range(len(data.files))]
        dtype = None if {matmul_dtype!r} is None else tf.as_dtype({matmul_dtype!r})
        out = fused_values_and_gradients(arrays[:6], arrays[6:], dtype, "sequence")
        np.savez({str(tmp_path / "out.npz")!r}, *[o.numpy() for o in out])
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    return [out[f"arr_{i}"] for i in range(len(out.files))]


# float32 with 21 rows (uneven row tiles); bfloat16 with 32 rows and 64 units, the shape the AMX
# tiles take where the CPU has them (the vector tiles elsewhere).
@pytest.mark.parametrize("matmul_dtype,batch", [(None, 21), ("bfloat16", 32)])
def test_sequence_ops_do_not_depend_on_the_thread_count(compiled_ops, tmp_path, matmul_dtype, batch):
    """Every element of the sequence ops is summed by one thread in a fixed order: one intra-op
    thread and the default pool give the same bits, forward and backward."""
    dtype = None if matmul_dtype is None else tf.as_dtype(matmul_dtype)
    if dtype is not None and not cell_ops.runs_sequence(cell_ops.load(), dtype):
        pytest.skip("this build has no bfloat16 sequence ops (no AVX512-BF16)")
    args, weights = lstm_args(np.random.default_rng(6), units=64, batch=batch, steps=6)
    one_thread = sequence_in_subprocess(tmp_path, args, weights, matmul_dtype, threads=1)
    pooled = sequence_in_subprocess(tmp_path, args, weights, matmul_dtype, threads=2)
    for value, expected in zip(pooled, one_thread):
        np.testing.assert_array_equal(value, expected)


# Measured at 32 rows x 64 units: AMX 0.92x-0.99x TensorFlow's error, the vector tiles the same
# within 0.01; the two differ by up to 3e-2 (bfloat16's step at the gradients' scale).
def test_bfloat16_sequence_ops_on_amx_tiles_are_as_accurate_as_tensorflow_ops(compiled_ops, tmp_path):
    """Where the CPU has AMX, the bfloat16 sequence ops multiply on its tiles (batch a multiple of
    16, units of 32): as accurate as TensorFlow's ops, and not the vector tiles' numbers
    (``CHARRNN_AMX=0``, in another process), so the AMX path is what was measured."""
    if not has_amx() or not cell_ops.runs_sequence(cell_ops.load(), tf.bfloat16):
        pytest.skip("no AMX on this machine")
    args, weights = lstm_args(np.random.default_rng(5), units=64, batch=32)
    exact = fused_values_and_gradients(args, weights, None, False)
    tf_ops = fused_values_and_gradients(args, weights, tf.bfloat16, False)
    amx = fused_values_and_gradients(args, weights, tf.bfloat16, "sequence")
    ratios = [rel_err(g, e) / rel_err(t, e) for e, t, g in zip(exact, tf_ops, amx)]
    print("error / TensorFlow ops' error:", ", ".join(f"{r:.3f}" for r in ratios))
    assert max(ratios) < 1.1
    vector = sequence_in_subprocess(tmp_path, args, weights, "bfloat16", env={"CHARRNN_AMX": "0"})
    assert any(np.any(a.numpy() != v) for a, v in zip(amx, vector)), "CHARRNN_AMX=0 changed nothing"


def test_sequence_ops_built_for_avx2_match_tensorflow_ops_and_build_once(compiled_ops, tmp_path):
    """The build an AVX2-only machine gets (8-float vectors, smaller tiles; ``CHARRNN_OPS_MARCH=haswell``
    asks for it on any x86-64 CPU with AVX2): the same values and gradients as TensorFlow's ops, as
    this machine's build (above); the library says it was built for AVX2 and the run's kernel line
    says so. Two processes asking for it at once build it once (the other waits and loads it)."""
    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("no AVX2 on this machine")
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        import numpy as np, tensorflow as tf
        from charrnn import cell_ops, lstm_cpu
        from charrnn.model import build_model
        from tests.test_lstm_cpu import fused_values_and_gradients, lstm_args, rel_err
        barrier = Path(sys.argv[1])
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 2:  # both ask for the build at once
            time.sleep(0.005)
        cell_ops.load()
        args, weights = lstm_args(np.random.default_rng(5))
        expected = fused_values_and_gradients(args, weights, None, False)
        got = fused_values_and_gradients(args, weights, None, "sequence")
        model = build_model(11, embedding_dim=4, rnn_units=16, num_layers=1, dropout=0.0, cell="lstm")
        lstm_cpu.install_model(model)
        print(max(rel_err(g, e) for e, g in zip(expected, got)), cell_ops.build_target()["isa"])
        print(lstm_cpu.kernel_path(model, 4))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CHARRNN_OPS_MARCH": "haswell", "XDG_CACHE_HOME": str(tmp_path)}
    (tmp_path / "barrier").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "barrier")], cwd=root, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        error, isa = out.splitlines()[-2].split()
        assert 0 < float(error) < 1e-6, error  # measured 4e-7, as this machine's build
        assert isa == "AVX2" and out.splitlines()[-1] == "compiled whole-sequence LSTM ops, float32 on AVX2"
    compiles = sum(err.count("compiling the LSTM cell ops") for _, err in outputs)
    assert compiles == 1, [err[-1000:] for _, err in outputs]
    assert len(list(tmp_path.glob("charrnn/ops/*/charrnn_lstm_cell_ops.so"))) == 1


def test_cell_ops_that_cannot_be_built_leave_one_note_and_tensorflow_ops(tmp_path):
    """A build that fails (``CXX=/bin/false``): one line saying so (after the progress line of the
    first try), and the same LSTM from TensorFlow's ops; remembered for that compiler, not retried.
    Another compiler (the advised fix) builds in the same cache."""
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        from charrnn import cell_ops, lstm_fused
        rng = np.random.default_rng(0)
        args = [tf.constant(rng.normal(0, 0.3, s).astype(np.float32))
                for s in ((2, 4, 3), (2, 8), (2, 8), (3, 32), (8, 32), (32,))]
        first = lstm_fused.fused_lstm(*args)[0]
        second = lstm_fused.fused_lstm(*args)[0]
        assert cell_ops.load() is None
        np.testing.assert_array_equal(first, lstm_fused.fused_lstm(*args, compiled=False)[0])
        print("ok")
    """)
    env = {**os.environ, "CXX": "/bin/false", "XDG_CACHE_HOME": str(tmp_path)}  # a compiler that always fails
    for attempt in ("first", "next"):
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[-1] == "ok"
        notes = [line for line in proc.stderr.splitlines() if line.startswith("lstm_cpu:")]
        if attempt == "first":  # "compiling ... (once)" and the one reason it is unavailable
            assert len(notes) == 2 and "compiling" in notes[0], notes
        else:  # remembered for this compiler: no second try, the same reason and where it is kept
            assert len(notes) == 1 and "remembered in" in notes[0], notes
        assert "compiled cell ops unavailable (false failed: exit status 1" in notes[-1], notes
    assert not list(tmp_path.glob("charrnn/ops/*/*.so"))  # no partial library left behind
    # Another compiler (another path and version line: the advised fix, installing one) is tried
    # afresh in the same cache, not refused with the first one's remembered failure.
    other = tmp_path / "other-c++"
    other.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'other-c++ 1.0' && exit 0\nexit 3\n")
    other.chmod(0o755)
    env["CXX"] = str(other)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    notes = [line for line in proc.stderr.splitlines() if line.startswith("lstm_cpu:")]
    assert proc.returncode == 0 and len(notes) == 2 and "compiling" in notes[0], notes
    assert "other-c++ failed: exit status 3" in notes[-1] and "remembered" not in notes[-1], notes
    assert len(list(tmp_path.glob("charrnn/ops/*/build-failed.txt"))) == 2  # one per compiler


def test_a_compiler_without_avx512fp16_options_still_builds_for_this_cpu(tmp_path, monkeypatch):
    """GCC 11 refuses -mno-avx512fp16: the build falls back to -march=native, not to a generic build.
    The library's code says so (AVX-512's zmm registers, else AVX2's ymm), not the flags asked for."""
    cpu = open("/proc/cpuinfo").read()
    if "avx2" not in cpu:
        pytest.skip("no AVX2 on this machine")
    if shutil.which("g++") is None or shutil.which("objdump") is None:
        missing_prerequisite("needs g++ and objdump (binutils)")
    wrapper = tmp_path / "g++-without-avx512fp16"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *avx512fp16*)\n'
                       '  echo "g++: error: unrecognized command-line option \'$a\'" >&2; exit 1;; esac; done\n'
                       'exec g++ "$@" -mno-avx512fp16\n')  # as GCC 11: -march=native without AVX512-FP16
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    cell_ops.build(tmp_path / "ops.so")
    code = subprocess.run(["objdump", "-d", str(tmp_path / "ops.so")], capture_output=True, text=True).stdout
    register = "zmm" if " avx512f " in f" {cpu} " else "ymm"
    assert len(re.findall(rf"%{register}\d+", code)) > 100, f"no {register} code: a generic build"


# ---- the fast path inside fit's train step -------------------------------------------------------
# Fails loudly when an upgrade takes the compiled ops out of fit; the canaries of the private seams
# install goes through (inner_loop, supports_jit, XLA detection) are in test_seams.py.


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
    from charrnn.model import compile_model as compile_
    compile_(model, 1e-2)
    ids = np.random.default_rng(0).integers(0, 11, (8, 10)).astype("int32")
    ops = fit_graph_ops(model, ids, ids)
    assert {"CharrnnLstmSequenceForward", "CharrnnLstmSequenceBackward"} <= ops, sorted(ops)
    assert "While" not in ops and "StatelessWhile" not in ops  # no per-step loop left
    lstm_cpu.uninstall(model.layers[2])  # the check can fail: Keras' own layer has no such op
    model.train_function = None
    assert "CharrnnLstmSequenceForward" not in fit_graph_ops(model, ids, ids)
