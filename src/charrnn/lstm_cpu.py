"""A fast LSTM for training on CPU, installed into ordinary ``keras.layers.LSTM`` instances.

Keras' LSTM on a machine without a GPU runs ``backend.rnn``: a ``tf.while_loop`` whose body calls
the LSTM cell (input projection, recurrent projection, gates) one timestep at a time, and whose
gradient TensorFlow derives op by op through that loop. :func:`fused_lstm` computes the same
function with a hand-written gradient (``tf.custom_gradient``):

* forward: the inputs of *all* timesteps are projected in one matmul before the recurrence; the
  loop then does only ``h @ recurrent_kernel`` and the gate arithmetic, keeping the activated
  gates and the cell states;
* backward: the loop computes only the gate gradients and ``dz @ recurrent_kernel^T``, one step at
  a time; the gradients of the kernel, the recurrent kernel and the bias, and of the inputs, are
  then single big matmuls (or one sum) over all timesteps at once;
* the recurrence itself runs in compiled ops (``lstm_cpu_ops.cc``, built on first use by
  :mod:`charrnn.cell_ops`): where units are a multiple of 16, the whole loop (its matmuls with the
  recurrent kernel and the gate arithmetic of every step) in one op per direction, with no
  TensorFlow op per timestep at all (bfloat16 matmuls need a build for AVX512-BF16); otherwise
  each step's gate arithmetic in one op instead of about 30 TensorFlow ops, whose dispatch is what
  a step of a small model waits on. Where the ops cannot be built, and under XLA, the same math
  runs on TensorFlow's ops.

:func:`install` makes an existing layer use it without changing the layer's class, config or
weights (it overrides the instance attribute ``inner_loop``, the hook ``LSTM.call`` goes through),
so a model saves as plain Keras and loads with plain Keras and ``safe_mode=True``. Where the layer
is configured in a way the fused kernel does not cover (a mask, ``go_backwards``, ``unroll``,
``stateful``, dropout, other activations, no bias) each call falls back to Keras' own path; on a
machine with a visible GPU ``install`` leaves the layer alone (cuDNN is faster there).

Usage (before ``model.compile``, so that ``jit_compile`` sees the layers as XLA-compatible)::

    from charrnn import lstm_cpu
    model = build_model(...)
    lstm_cpu.install_model(model)      # or lstm_cpu.install(layer) per layer
    compile_model(model, ...)
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from charrnn import cell_ops, seams
from charrnn.model import lstm_cell

__all__ = ["fused_lstm", "install", "install_model", "uninstall", "is_installed", "eligible"]

_ATTR = "_charrnn_fused_lstm_original_inner_loop"


# ---- the kernel --------------------------------------------------------------------------------


def fused_lstm(inputs, h0, c0, kernel, recurrent_kernel, bias, matmul_dtype=None, compiled=True):
    """One LSTM layer over a whole sequence, Keras' weight layout and gate order (i, f, c, o).

    inputs [batch, time, in]; h0, c0 [batch, units]; kernel [in, 4u]; recurrent_kernel [u, 4u];
    bias [4u]. Activations: sigmoid for the gates, tanh for the candidate and the output, as
    ``keras.layers.LSTM`` with its default arguments. Returns ``(outputs [batch, time, units],
    last_h, last_c)`` in the dtype of ``inputs`` (the compute dtype: under a mixed policy the
    float32 weights are cast once here, outside the loop, and the casts' gradients take the
    gradients back to float32). Differentiable w.r.t. every argument.

    ``matmul_dtype`` (e.g. ``tf.bfloat16`` with float32 ``inputs``) runs every matmul in that dtype
    (inputs and results cast, accumulation inside the matmul in float32) and keeps the gate
    arithmetic and the state in the dtype of ``inputs``; ``None`` runs everything in that dtype.
    :func:`install` uses it for layers whose compute dtype is bfloat16.

    ``compiled`` uses the compiled ops of :mod:`charrnn.cell_ops` where they are available, the
    gates are float32 and XLA is not compiling the caller: ``True`` (or ``"sequence"``) runs the
    whole recurrence, matmuls included, in one op per direction where ``units`` is a multiple of 16
    and the matmuls are float32 (or bfloat16, with a build for AVX512-BF16), else each step's gate
    arithmetic in one op (the same math in one op per step and direction instead of about 30);
    ``"cell"`` always the latter; False keeps TensorFlow's own ops.
    """
    dtype = inputs.dtype
    h0 = tf.cast(h0, dtype)
    c0 = tf.cast(c0, dtype)
    kernel = tf.cast(kernel, dtype)
    recurrent_kernel = tf.cast(recurrent_kernel, dtype)
    bias = tf.cast(bias, dtype)
    mm_dtype = tf.as_dtype(matmul_dtype) if matmul_dtype is not None else dtype
    if compiled not in (True, False, "sequence", "cell"):
        raise ValueError(f"compiled must be True, False, 'sequence' or 'cell', not {compiled!r}")
    ops = cell_ops.load() if compiled and dtype == tf.float32 and not seams.in_xla_context() else None
    fused = _make_fused(mm_dtype, ops, sequence=compiled in (True, "sequence"))
    return fused(inputs, h0, c0, kernel, recurrent_kernel, bias)


_FUSED_CACHE: dict = {}
_PARALLEL_ITERATIONS = 1


def _make_fused(mm_dtype, ops=None, sequence=False):
    key = (mm_dtype, ops, sequence)
    if key in _FUSED_CACHE:
        return _FUSED_CACHE[key]

    @tf.custom_gradient
    def _fused(x, h0, c0, kernel, recurrent_kernel, bias):
        dtype = x.dtype
        units = recurrent_kernel.shape[0]
        n_in = kernel.shape[0]
        batch = tf.shape(x)[0]
        steps = tf.shape(x)[1]
        one = tf.constant(1, dtype)
        sequence_ops = sequence and cell_ops.runs_sequence(ops, mm_dtype) and units % 16 == 0

        def cast_mm(t):
            return t if mm_dtype == dtype else tf.cast(t, mm_dtype)

        def cast_back(t):
            return t if mm_dtype == dtype else tf.cast(t, dtype)

        def mm(a, b, **kwargs):
            return cast_back(tf.matmul(cast_mm(a), cast_mm(b), **kwargs))

        # Time-major; the input projection of every timestep in one matmul.
        xt = tf.transpose(x, [1, 0, 2])                                        # [T, B, in]
        xz = tf.reshape(mm(tf.reshape(xt, [-1, n_in]), kernel) + bias,
                        [steps, batch, 4 * units])                             # [T, B, 4u]
        rk = cast_mm(recurrent_kernel)

        # The compiled ops take and give the tensors that meet a matmul (h forward; dh, dz
        # backward) in the matmul dtype, rounded as a cast would: no cast ops in the loop.
        hdtype = mm_dtype if ops is not None else dtype

        def ta(width, ta_dtype=dtype):
            return tf.TensorArray(ta_dtype, size=steps, element_shape=tf.TensorShape([None, width]))

        # The forward step also computes, while its tensors are in cache, what the backward step
        # needs: dz = concat([dc, dc, dc, dh]) * factors, dc += dh * dh_to_dc, dc_prev = dc * f.
        # Saved per step as one [B, 6u] tensor: factors [4u] | dh_to_dc [u] | f [u].
        def forward_body(t, h, c, ta_h, ta_saved):
            if ops is not None:
                h, c_new, saved = ops.charrnn_lstm_cell_forward(xz[t], tf.matmul(h, rk), c)
                return t + 1, h, c_new, ta_h.write(t, h), ta_saved.write(t, saved)
            h, c_new, (i, f, g, o, tanh_c) = lstm_cell(xz[t] + cast_back(tf.matmul(cast_mm(h), rk)), c)
            saved = tf.concat([tf.concat([g, c, i, tanh_c], axis=1) * tf.concat(
                [i - i * i, f - f * f, one - g * g, o - o * o], axis=1),  # the activations' derivatives
                o - h * tanh_c,  # dh_to_dc = o * (1 - tanh(c)^2)
                f], axis=1)
            return t + 1, h, c_new, ta_h.write(t, h), ta_saved.write(t, saved)

        if sequence_ops:
            # The whole recurrence in one compiled op (matmuls included); no TensorFlow loop.
            hs, c_last, saved_all = ops.charrnn_lstm_sequence_forward(xz, rk, tf.cast(h0, hdtype), c0)
            h_last = tf.cond(steps > 0, lambda: hs[-1], lambda: tf.cast(h0, hdtype))
        else:
            _, h_last, c_last, ta_h, saved_all = tf.while_loop(
                lambda t, *_: t < steps,
                forward_body,
                (tf.constant(0), tf.cast(h0, hdtype), c0, ta(units, hdtype), ta(6 * units)),
                parallel_iterations=_PARALLEL_ITERATIONS,
            )
            hs = ta_h.stack()                                                  # [T, B, u]
        outputs = tf.transpose(tf.cast(hs, dtype), [1, 0, 2])
        h_last = tf.cast(h_last, dtype)

        def grad(d_outputs, d_h_last, d_c_last):
            zeros = tf.zeros_like(h0)
            d_h_last = zeros if d_h_last is None else tf.cast(d_h_last, dtype)
            d_c_last = zeros if d_c_last is None else tf.cast(d_c_last, dtype)
            if d_outputs is None:
                d_hs = tf.zeros(tf.shape(hs), dtype)  # hs may be in the matmul dtype
            else:
                d_hs = tf.transpose(tf.cast(d_outputs, dtype), [1, 0, 2])      # [T, B, u]
            if sequence_ops:
                dz_all, dh0, dc0 = ops.charrnn_lstm_sequence_backward(d_hs, d_h_last, d_c_last,
                                                                     saved_all, rk)
                return weight_gradients(dz_all, dh0, dc0)
            rk_t = tf.transpose(rk)

            def backward_body(t, dh_next, dc_next, ta_dz):
                saved = saved_all.read(t)
                if ops is not None:
                    dz, dc_prev = ops.charrnn_lstm_cell_backward(d_hs[t], dh_next, dc_next, saved)
                    return t - 1, tf.matmul(dz, rk_t), dc_prev, ta_dz.write(t, dz)
                dh = d_hs[t] + dh_next
                dc = dc_next + dh * saved[:, 4 * units:5 * units]
                dz = tf.concat([dc, dc, dc, dh], axis=1) * saved[:, :4 * units]
                dh_prev = cast_back(tf.matmul(cast_mm(dz), rk_t))
                return t - 1, dh_prev, dc * saved[:, 5 * units:], ta_dz.write(t, dz)

            _, dh0, dc0, ta_dz = tf.while_loop(
                lambda t, *_: t >= 0,
                backward_body,
                (steps - 1, tf.cast(d_h_last, hdtype), d_c_last, ta(4 * units, hdtype)),
                parallel_iterations=_PARALLEL_ITERATIONS,
            )
            return weight_gradients(ta_dz.stack(), dh0, dc0)

        def weight_gradients(dz_all, dh0, dc0):                                 # dz_all [T, B, 4u]
            dh0 = tf.cast(dh0, dtype)
            dz_flat = tf.reshape(dz_all, [-1, 4 * units])
            d_kernel = mm(tf.reshape(xt, [-1, n_in]), dz_flat, transpose_a=True)
            # sum_t h_{t-1}^T dz_t, without building the shifted copy of the hidden states
            d_recurrent = mm(h0, dz_all[0], transpose_a=True) + mm(
                tf.reshape(hs[:-1], [-1, units]), tf.reshape(dz_all[1:], [-1, 4 * units]),
                transpose_a=True)
            # Over the batch, then over time: one reduce_sum over all T * B rows is slower
            # (lstm_recurrence.py: bias_gradient_one_reduce).
            d_bias = tf.reduce_sum(tf.reduce_sum(tf.cast(dz_all, dtype), axis=1), axis=0)
            d_x = tf.transpose(
                tf.reshape(mm(dz_flat, kernel, transpose_b=True), [steps, batch, n_in]),
                [1, 0, 2])
            return d_x, dh0, dc0, d_kernel, d_recurrent, d_bias

        return (outputs, h_last, c_last), grad

    _FUSED_CACHE[key] = _fused
    return _fused


# ---- installing it into keras.layers.LSTM -----------------------------------------------------


def _gpu_visible() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def eligible(layer, mask=None) -> bool:
    """Whether the fused kernel computes exactly what ``layer`` would (else Keras' path runs)."""
    cell = layer.cell
    return (
        mask is None
        and keras.backend.backend() == "tensorflow"
        and not layer.go_backwards
        and not layer.unroll
        and not layer.stateful
        and cell.use_bias
        and cell.activation is keras.activations.tanh
        and cell.recurrent_activation is keras.activations.sigmoid
        and not cell.dropout
        and not cell.recurrent_dropout
    )


def is_installed(layer) -> bool:
    return _ATTR in layer.__dict__


def install(layer, *, force: bool = False, matmul_dtype=None, compiled: bool = True) -> bool:
    """Make ``layer`` (a built or unbuilt ``keras.layers.LSTM``) run :func:`fused_lstm`.

    Only the instance's ``inner_loop`` is replaced (and ``supports_jit`` set, so that
    ``compile(jit_compile=True)`` keeps XLA on): class, config and weights are untouched. Returns
    True if installed. With a GPU visible nothing is done (cuDNN is used there) unless ``force``.
    Under a bfloat16 compute dtype the matmuls run in bfloat16 and the gates and state in float32
    (``matmul_dtype`` overrides); outputs and states come back in the compute dtype. ``compiled``
    as in :func:`fused_lstm` (False: TensorFlow's ops only, for comparing the two).
    Install before ``model.compile`` (and before the first ``fit``/``predict``: an already traced
    function keeps the path it traced).
    """
    if not isinstance(layer, keras.layers.LSTM):
        raise TypeError(f"install() takes a keras.layers.LSTM, got {type(layer).__name__}")
    if is_installed(layer):
        return True
    if _gpu_visible() and not force:
        return False

    def inner_loop(sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if not eligible(layer, mask):
            return original(sequences, initial_state, mask, training=training)
        h0, c0 = initial_state
        cell = layer.cell
        dtype = sequences.dtype
        if dtype == tf.bfloat16 and matmul_dtype is None:
            # bfloat16 where it pays, float32 where precision matters: the cell state carried over
            # hundreds of steps and the gate arithmetic stay float32, the matmuls run in bfloat16.
            outputs, h, c = fused_lstm(tf.cast(sequences, tf.float32), h0, c0, cell.kernel,
                                       cell.recurrent_kernel, cell.bias, matmul_dtype=tf.bfloat16,
                                       compiled=compiled)
            outputs, h, c = (tf.cast(t, dtype) for t in (outputs, h, c))
        else:
            outputs, h, c = fused_lstm(sequences, h0, c0, cell.kernel, cell.recurrent_kernel,
                                       cell.bias, matmul_dtype=matmul_dtype, compiled=compiled)
        return h, outputs, [h, c]

    supports_jit = seams.jit_compatible(layer)
    original = seams.replace_lstm_inner_loop(layer, inner_loop)  # Keras' own, bound: the fallback above
    object.__setattr__(layer, _ATTR, (original, supports_jit))
    if eligible(layer):
        seams.set_jit_compatible(layer, True)
    return True


def kernel_path(model, batch_size: int, jit_compile: bool = False) -> str:
    """In words, what computes ``model``'s recurrent layers in training: the compiled whole-sequence
    ops and the instruction set they run on, the per-step compiled ops, TensorFlow's ops, cuDNN, or
    Keras' own layer. Printed at the start of training and recorded with the run."""
    lstms = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.LSTM)]
    if not lstms:
        return "Keras' own layer (GRU)"
    if _gpu_visible():
        return "cuDNN (GPU)"
    if not all(is_installed(layer) and eligible(layer) for layer in lstms):
        return "Keras' own LSTM layer (a configuration the fused kernel does not cover)"
    if jit_compile:
        return "fused LSTM on TensorFlow's ops, compiled by XLA (custom ops cannot be)"
    ops = cell_ops.load()
    if ops is None:
        return "fused LSTM on TensorFlow's ops (no compiled ops: see the note above)"
    build = cell_ops.build_target()
    units = {layer.units for layer in lstms}
    bfloat16 = any(layer.compute_dtype == "bfloat16" for layer in lstms)
    mm_dtype = tf.bfloat16 if bfloat16 else tf.float32
    if not (cell_ops.runs_sequence(ops, mm_dtype) and all(u % 16 == 0 for u in units)):
        return "compiled per-step LSTM cell ops" + (" (matmuls in bfloat16 on TensorFlow's ops)" if bfloat16 else "")
    built_for = build["isa"]  # what the library was compiled for (runs_sequence: bfloat16 => AVX512-BF16 or AMX)
    if bfloat16 and built_for == "AMX" and os.environ.get("CHARRNN_AMX", "1") != "0" \
            and batch_size % 16 == 0 and all(u % 32 == 0 for u in units):
        isa = "AMX tiles"
    elif bfloat16:
        isa = "AVX512-BF16"
    elif built_for in ("AMX", "AVX512-BF16", "AVX-512"):
        isa = "AVX-512"
    elif built_for == "AVX2":
        isa = "AVX2"
    else:
        isa = "generic build (no -march)"
    return f"compiled whole-sequence LSTM ops, {'bfloat16' if bfloat16 else 'float32'} on {isa}"


def all_layers(model) -> list:
    """Every layer of ``model``, those of nested models too (Keras' public ``layers``, recursively)."""
    return [inner for layer in model.layers
            for inner in [layer, *(all_layers(layer) if hasattr(layer, "layers") else [])]]


def uninstall(layer) -> None:
    """Undo :func:`install` (Keras' own path and ``supports_jit`` again)."""
    if not is_installed(layer):
        return
    _, supports_jit = layer.__dict__.pop(_ATTR)
    seams.restore_lstm_inner_loop(layer)
    seams.set_jit_compatible(layer, supports_jit)


def install_model(model, **kwargs) -> int:
    """:func:`install` into every ``keras.layers.LSTM`` of ``model`` (nested ones too); returns
    how many were installed (0 with a GPU visible).

    Drops the model's already traced train/test/predict functions, so the next call retraces
    with the fused kernel. ``jit_compile`` is decided by ``compile``: install before it.
    """
    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.LSTM)]
    installed = sum(install(layer, **kwargs) for layer in layers)
    if installed:
        for name in ("train_function", "test_function", "predict_function"):
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
    return installed
