"""A fast LSTM for training on CPU, installed into ordinary ``keras.layers.LSTM`` instances.

Keras' LSTM on a machine without a GPU runs ``backend.rnn``: a ``tf.while_loop`` whose body calls
the LSTM cell (input projection, recurrent projection, gates) one timestep at a time, and whose
gradient TensorFlow derives op by op through that loop. :func:`charrnn.lstm_fused.fused_lstm`
computes the same function with a hand-written gradient, its recurrence in compiled ops
(``lstm_cpu_ops.cc``, built on first use by :mod:`charrnn.cell_ops`) where they can be built and
on TensorFlow's ops elsewhere; this module puts it into Keras layers.

:func:`install` makes an existing layer use it without changing the layer's class, config or
weights (it overrides the instance attribute ``inner_loop``, the hook ``LSTM.call`` goes through),
so a model saves as plain Keras and loads with plain Keras and ``safe_mode=True``. Where the layer
is configured in a way the fused kernel does not cover (a mask, ``go_backwards``, ``unroll``,
dropout, other activations, no bias) each call falls back to Keras' own path; on a machine with a
visible GPU ``install`` leaves the layer alone (cuDNN is faster there). A ``stateful`` layer runs
the fused kernel too: Keras' ``RNN.call`` hands ``inner_loop`` the carried state and stores the
state it returns.

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
from charrnn.lstm_fused import fused_lstm

__all__ = ["install", "install_model", "uninstall", "is_installed", "eligible", "available_kernels", "KERNELS"]

_ATTR = "_charrnn_fused_lstm_original_inner_loop"

# The paths that compute the fused LSTM (``train.lstm_kernel``), as fused_lstm's ``compiled``: the
# whole recurrence in one compiled op per direction, one compiled op per timestep around TensorFlow's
# matmul, or TensorFlow's ops only. They compute the same math; results differ in the last bits.
KERNELS = {"sequence": "sequence", "cell": "cell", "tf": False}


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
        and cell.use_bias
        and cell.activation is keras.activations.tanh
        and cell.recurrent_activation is keras.activations.sigmoid
        and not cell.dropout
        and not cell.recurrent_dropout
    )


def is_installed(layer) -> bool:
    return _ATTR in layer.__dict__


def install(layer, *, force: bool = False, matmul_dtype=None, kernel: str = "sequence",
            weight_drop: float = 0.0) -> bool:
    """Make ``layer`` (a built or unbuilt ``keras.layers.LSTM``) run :func:`~charrnn.lstm_fused.fused_lstm`.

    Only the instance's ``inner_loop`` is replaced (and ``supports_jit`` set, so that
    ``compile(jit_compile=True)`` keeps XLA on): class, config and weights are untouched. Returns
    True if installed. With a GPU visible nothing is done (cuDNN is used there) unless ``force``.
    Under a bfloat16 compute dtype the matmuls run in bfloat16 and the gates and state in float32
    (``matmul_dtype`` overrides); outputs and states come back in the compute dtype. ``kernel``: one
    of ``KERNELS`` (``sequence`` falls back to ``cell`` where the whole-sequence ops cannot run, and
    both to ``tf`` where there are no compiled ops or XLA compiles the step).
    ``weight_drop`` (AWD-LSTM's weight drop, DropConnect) multiplies the recurrent kernel by a dropout
    mask (scaled by ``1 / (1 - weight_drop)``) drawn once per call in training, from the cell's own
    seed generator (whose state a checkpoint keeps); the ops see the dropped kernel, so the fast
    path stays on. cuDNN cannot drop weights: with a GPU visible such a layer runs the fused LSTM on
    TensorFlow's ops.
    Install before ``model.compile`` (and before the first ``fit``/``predict``: an already traced
    function keeps the path it traced).
    """
    if not isinstance(layer, keras.layers.LSTM):
        raise TypeError(f"install() takes a keras.layers.LSTM, got {type(layer).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, not {kernel!r}")
    if is_installed(layer):
        uninstall(layer)  # installed again with this kernel
    if _gpu_visible() and not force and not weight_drop:
        return False
    compiled = False if _gpu_visible() and not force else KERNELS[kernel]

    def inner_loop(sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if not eligible(layer, mask):
            return original(sequences, initial_state, mask, training=training)
        h0, c0 = initial_state
        cell = layer.cell
        dtype = sequences.dtype
        recurrent_kernel = cell.recurrent_kernel
        if training and weight_drop:
            recurrent_kernel = keras.random.dropout(recurrent_kernel, weight_drop, seed=seams.cell_seed_generator(layer))
        if dtype == tf.bfloat16 and matmul_dtype is None:
            # bfloat16 where it pays, float32 where precision matters: the cell state carried over
            # hundreds of steps and the gate arithmetic stay float32, the matmuls run in bfloat16.
            outputs, h, c = fused_lstm(tf.cast(sequences, tf.float32), h0, c0, cell.kernel,
                                       recurrent_kernel, cell.bias, matmul_dtype=tf.bfloat16,
                                       compiled=compiled)
            outputs, h, c = (tf.cast(t, dtype) for t in (outputs, h, c))
        else:
            outputs, h, c = fused_lstm(sequences, h0, c0, cell.kernel, recurrent_kernel,
                                       cell.bias, matmul_dtype=matmul_dtype, compiled=compiled)
        return h, outputs, [h, c]

    supports_jit = seams.jit_compatible(layer)
    original = seams.replace_lstm_inner_loop(layer, inner_loop)  # Keras' own, bound: the fallback above
    object.__setattr__(layer, _ATTR, (original, supports_jit, kernel))
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
        if any(is_installed(layer) for layer in lstms):
            return "fused LSTM on TensorFlow's ops (GPU: cuDNN cannot drop weights)"
        return "cuDNN (GPU)"
    if not all(is_installed(layer) and eligible(layer) for layer in lstms):
        return "Keras' own LSTM layer (a configuration the fused kernel does not cover)"
    if jit_compile:
        return "fused LSTM on TensorFlow's ops, compiled by XLA (custom ops cannot be)"
    kernels = {layer.__dict__[_ATTR][2] for layer in lstms}
    if kernels == {"tf"}:
        return "fused LSTM on TensorFlow's ops"
    ops = cell_ops.load()
    if ops is None:
        return "fused LSTM on TensorFlow's ops (no compiled ops: see the note above)"
    build = cell_ops.build_target()
    bfloat16 = any(layer.compute_dtype == "bfloat16" for layer in lstms)
    if kernels != {"sequence"} or not all("sequence" in available_kernels("lstm", layer.units, bfloat16)
                                          for layer in lstms):
        return "compiled per-step LSTM cell ops" + (" (matmuls in bfloat16 on TensorFlow's ops)" if bfloat16 else "")
    units = {layer.units for layer in lstms}
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


def available_kernels(cell: str, units: int, bfloat16: bool = False, jit_compile: bool = False) -> tuple[str, ...]:
    """The ``KERNELS`` that can compute LSTM layers of ``units`` here: all three where the compiled
    ops load, units are a multiple of 16 and (for ``bfloat16`` compute) the build has the bfloat16
    sequence ops; ``cell`` and ``tf`` short of that; ``tf`` alone without compiled ops or under XLA;
    none for a GRU, or on a GPU (cuDNN computes the LSTM there)."""
    if cell != "lstm" or _gpu_visible():
        return ()
    ops = None if jit_compile else cell_ops.load()
    if ops is None:
        return ("tf",)
    sequence = units % 16 == 0 and cell_ops.runs_sequence(ops, tf.bfloat16 if bfloat16 else tf.float32)
    return ("sequence", "cell", "tf") if sequence else ("cell", "tf")


def all_layers(model) -> list:
    """Every layer of ``model``, those of nested models too (Keras' public ``layers``, recursively)."""
    return [inner for layer in model.layers
            for inner in [layer, *(all_layers(layer) if hasattr(layer, "layers") else [])]]


def uninstall(layer) -> None:
    """Undo :func:`install` (Keras' own path and ``supports_jit`` again)."""
    if not is_installed(layer):
        return
    _, supports_jit, _ = layer.__dict__.pop(_ATTR)
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
