"""The fused LSTM's math: its forward recurrence and its hand-written gradient.

Kept apart from :mod:`charrnn.lstm_cpu`, which installs it into Keras layers, so that the numbers
live in one module. :func:`fused_lstm` computes what ``keras.layers.LSTM`` computes, with a
``tf.custom_gradient`` instead of the gradient TensorFlow derives op by op through Keras' loop:

* forward: the inputs of *all* timesteps are projected in one matmul before the recurrence; the
  loop then does only ``h @ recurrent_kernel`` and the gate arithmetic, keeping the activated
  gates and the cell states;
* backward: the loop computes only the gate gradients and ``dz @ recurrent_kernel^T``, one step at
  a time; the gradients of the kernel, the recurrent kernel and the bias, and of the inputs, are
  then single big matmuls (or one sum) over all timesteps at once;
* the recurrence runs in the compiled ops of :mod:`charrnn.cell_ops` (``lstm_cpu_ops.cc``): where
  units are a multiple of 16, the whole loop in one op per direction (bfloat16 matmuls need a build
  for AVX512-BF16); otherwise each step's gate arithmetic in one op instead of about 30 TensorFlow
  ops, whose dispatch is what a step of a small model waits on. Where the ops cannot be built, and
  under XLA, the same math runs on TensorFlow's ops.
"""

from __future__ import annotations

import tensorflow as tf

from charrnn import cell_ops, seams
from charrnn.model import lstm_cell

__all__ = ["fused_lstm"]


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
    :func:`charrnn.lstm_cpu.install` uses it for layers whose compute dtype is bfloat16.

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
    """The ``tf.custom_gradient`` op for one matmul dtype and choice of compiled ops (cached)."""
    key = (mm_dtype, ops, sequence)
    if key in _FUSED_CACHE:
        return _FUSED_CACHE[key]

    @tf.custom_gradient
    def _fused(x, h0, c0, kernel, recurrent_kernel, bias):
        lstm = _FusedCall(x, h0, kernel, recurrent_kernel, bias, mm_dtype, ops, sequence)
        outputs, h_last, c_last = lstm.forward(c0)
        return (outputs, h_last, c_last), lstm.grad

    _FUSED_CACHE[key] = _fused
    return _fused


class _FusedCall:
    """One call of the fused op: what its forward pass keeps for its gradient, and both passes."""

    def __init__(self, x, h0, kernel, recurrent_kernel, bias, mm_dtype, ops, sequence):
        self.mm_dtype, self.ops, self.h0, self.kernel = mm_dtype, ops, h0, kernel
        dtype = self.dtype = x.dtype
        units = self.units = recurrent_kernel.shape[0]
        n_in = self.n_in = kernel.shape[0]
        batch = self.batch = tf.shape(x)[0]
        steps = self.steps = tf.shape(x)[1]
        self.one = tf.constant(1, dtype)
        self.sequence_ops = sequence and cell_ops.runs_sequence(ops, mm_dtype) and units % 16 == 0

        # Time-major; the input projection of every timestep in one matmul.
        self.xt = tf.transpose(x, [1, 0, 2])                                   # [T, B, in]
        self.xz = tf.reshape(self.mm(tf.reshape(self.xt, [-1, n_in]), kernel) + bias,
                             [steps, batch, 4 * units])                        # [T, B, 4u]
        self.rk = self.cast_mm(recurrent_kernel)

        # The compiled ops take and give the tensors that meet a matmul (h forward; dh, dz
        # backward) in the matmul dtype, rounded as a cast would: no cast ops in the loop.
        self.hdtype = mm_dtype if ops is not None else dtype

    def cast_mm(self, t):
        return t if self.mm_dtype == self.dtype else tf.cast(t, self.mm_dtype)

    def cast_back(self, t):
        return t if self.mm_dtype == self.dtype else tf.cast(t, self.dtype)

    def mm(self, a, b, **kwargs):
        return self.cast_back(tf.matmul(self.cast_mm(a), self.cast_mm(b), **kwargs))

    def ta(self, width, ta_dtype=None):
        ta_dtype = self.dtype if ta_dtype is None else ta_dtype
        return tf.TensorArray(ta_dtype, size=self.steps, element_shape=tf.TensorShape([None, width]))

    # ---- forward ----

    def forward(self, c0):
        """``(outputs [B, T, u], h_last, c_last)``; keeps ``hs`` and ``saved_all`` for :meth:`grad`."""
        ops, dtype, h0, steps, rk = self.ops, self.dtype, self.h0, self.steps, self.rk
        if self.sequence_ops:
            # The whole recurrence in one compiled op (matmuls included); no TensorFlow loop.
            hs, c_last, saved_all = ops.charrnn_lstm_sequence_forward(self.xz, rk, tf.cast(h0, self.hdtype), c0)
            h_last = tf.cond(steps > 0, lambda: hs[-1], lambda: tf.cast(h0, self.hdtype))
        else:
            _, h_last, c_last, ta_h, saved_all = tf.while_loop(
                lambda t, *_: t < steps,
                self.forward_body,
                (tf.constant(0), tf.cast(h0, self.hdtype), c0, self.ta(self.units, self.hdtype),
                 self.ta(6 * self.units)),
                parallel_iterations=_PARALLEL_ITERATIONS,
            )
            hs = ta_h.stack()                                                  # [T, B, u]
        self.hs, self.saved_all = hs, saved_all
        outputs = tf.transpose(tf.cast(hs, dtype), [1, 0, 2])
        h_last = tf.cast(h_last, dtype)
        return outputs, h_last, c_last

    # The forward step also computes, while its tensors are in cache, what the backward step
    # needs: dz = concat([dc, dc, dc, dh]) * factors, dc += dh * dh_to_dc, dc_prev = dc * f.
    # Saved per step as one [B, 6u] tensor: factors [4u] | dh_to_dc [u] | f [u].
    def forward_body(self, t, h, c, ta_h, ta_saved):
        xz, rk, one = self.xz, self.rk, self.one
        if self.ops is not None:
            h, c_new, saved = self.ops.charrnn_lstm_cell_forward(xz[t], tf.matmul(h, rk), c)
            return t + 1, h, c_new, ta_h.write(t, h), ta_saved.write(t, saved)
        h, c_new, (i, f, g, o, tanh_c) = lstm_cell(xz[t] + self.cast_back(tf.matmul(self.cast_mm(h), rk)), c)
        saved = tf.concat([tf.concat([g, c, i, tanh_c], axis=1) * tf.concat(
            [i - i * i, f - f * f, one - g * g, o - o * o], axis=1),  # the activations' derivatives
            o - h * tanh_c,  # dh_to_dc = o * (1 - tanh(c)^2)
            f], axis=1)
        return t + 1, h, c_new, ta_h.write(t, h), ta_saved.write(t, saved)

    # ---- backward ----

    def grad(self, d_outputs, d_h_last, d_c_last):
        """The gradients of all six inputs of the op."""
        dtype, hs, steps, ops = self.dtype, self.hs, self.steps, self.ops
        zeros = tf.zeros_like(self.h0)
        d_h_last = zeros if d_h_last is None else tf.cast(d_h_last, dtype)
        d_c_last = zeros if d_c_last is None else tf.cast(d_c_last, dtype)
        if d_outputs is None:
            d_hs = tf.zeros(tf.shape(hs), dtype)  # hs may be in the matmul dtype
        else:
            d_hs = tf.transpose(tf.cast(d_outputs, dtype), [1, 0, 2])          # [T, B, u]
        if self.sequence_ops:
            dz_all, dh0, dc0 = ops.charrnn_lstm_sequence_backward(d_hs, d_h_last, d_c_last,
                                                                 self.saved_all, self.rk)
            return self.weight_gradients(dz_all, dh0, dc0)
        rk_t = tf.transpose(self.rk)

        def backward_body(t, dh_next, dc_next, ta_dz):
            return self.backward_step(t, dh_next, dc_next, ta_dz, d_hs, rk_t)

        _, dh0, dc0, ta_dz = tf.while_loop(
            lambda t, *_: t >= 0,
            backward_body,
            (steps - 1, tf.cast(d_h_last, self.hdtype), d_c_last, self.ta(4 * self.units, self.hdtype)),
            parallel_iterations=_PARALLEL_ITERATIONS,
        )
        return self.weight_gradients(ta_dz.stack(), dh0, dc0)

    def backward_step(self, t, dh_next, dc_next, ta_dz, d_hs, rk_t):
        units = self.units
        saved = self.saved_all.read(t)
        if self.ops is not None:
            dz, dc_prev = self.ops.charrnn_lstm_cell_backward(d_hs[t], dh_next, dc_next, saved)
            return t - 1, tf.matmul(dz, rk_t), dc_prev, ta_dz.write(t, dz)
        dh = d_hs[t] + dh_next
        dc = dc_next + dh * saved[:, 4 * units:5 * units]
        dz = tf.concat([dc, dc, dc, dh], axis=1) * saved[:, :4 * units]
        dh_prev = self.cast_back(tf.matmul(self.cast_mm(dz), rk_t))
        return t - 1, dh_prev, dc * saved[:, 5 * units:], ta_dz.write(t, dz)

    def weight_gradients(self, dz_all, dh0, dc0):                               # dz_all [T, B, 4u]
        dtype, units, n_in, hs, mm = self.dtype, self.units, self.n_in, self.hs, self.mm
        dh0 = tf.cast(dh0, dtype)
        dz_flat = tf.reshape(dz_all, [-1, 4 * units])
        d_kernel = mm(tf.reshape(self.xt, [-1, n_in]), dz_flat, transpose_a=True)
        # sum_t h_{t-1}^T dz_t, without building the shifted copy of the hidden states
        d_recurrent = mm(self.h0, dz_all[0], transpose_a=True) + mm(
            tf.reshape(hs[:-1], [-1, units]), tf.reshape(dz_all[1:], [-1, 4 * units]),
            transpose_a=True)
        # Over the batch, then over time: one reduce_sum over all T * B rows is slower
        # (lstm_recurrence.py: bias_gradient_one_reduce).
        d_bias = tf.reduce_sum(tf.reduce_sum(tf.cast(dz_all, dtype), axis=1), axis=0)
        d_x = tf.transpose(
            tf.reshape(mm(dz_flat, self.kernel, transpose_b=True), [self.steps, self.batch, n_in]),
            [1, 0, 2])
        return d_x, dh0, dc0, d_kernel, d_recurrent, d_bias
