"""The compiled LSTM ops of ``lstm_cpu_ops.cc``: built once per machine, loaded on demand.

TensorFlow's pip package ships its headers and ``tf.sysconfig`` gives the flags to build ops
against it, so the kernels (one LSTM step's gate arithmetic per direction, and the whole
recurrence per direction) are compiled here, on the user's machine, the first time a
CPU training needs them (about half a minute), and cached beside the precision verdict
(``~/.cache/charrnn/ops/<key>/``, the key covering the source, TensorFlow's version and the
machine). Where there is no C++ compiler, or the build or load fails, :func:`load` returns None
once with a one-line note and the fused LSTM runs its Python ops, which compute the same math.
``CHARRNN_CELL_OPS=0`` turns the compiled ops off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("lstm_cpu_ops.cc")

_loaded: dict = {}


def cache_dir() -> Path:
    from charrnn.precision import cache_file

    return cache_file().parent / "ops"  # beside the precision verdict


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def library_path() -> Path:
    """Where this machine's build of the ops lives (it may not exist yet)."""
    from charrnn.precision import machine_kind

    # machine_kind() names the processor, its flags and TensorFlow's version
    key = hashlib.sha256(SOURCE.read_bytes() + machine_kind().encode() + sys.version.encode()).hexdigest()[:16]
    return cache_dir() / key / "charrnn_lstm_cell_ops.so"


def build(target: Path, machine: list[str] | None = None) -> None:
    """Compile the ops into ``target`` (written to a temporary name and renamed). ``machine``:
    the target flags to use instead of this machine's (e.g. ``["-march=haswell"]``)."""
    import tensorflow as tf

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build.", suffix=".so", dir=target.parent)
    os.close(fd)
    # Built for, and cached per, this kind of machine: -march=native, except AVX512-FP16, whose
    # Eigen packet code GCC 12 cannot compile; a compiler that refuses those flags gets a plain -O3.
    flags = [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    errors = []
    try:
        for target_flags in ([machine] if machine is not None else [["-march=native", "-mno-avx512fp16"], []]):
            command = [compiler, "-shared", "-fPIC", "-O3", "-w", *target_flags, str(SOURCE), "-o", tmp, *flags]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(tmp, target)
                return
            lines = result.stderr.strip().splitlines()
            errors.append(next((line for line in lines if "error" in line), lines[-1] if lines else "no message"))
        raise RuntimeError(f"{Path(compiler).name} failed: {errors[-1].strip()}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def load():
    """The loaded op module (``.charrnn_lstm_cell_forward``/``_backward``), or None if unavailable."""
    if "module" in _loaded:
        return _loaded["module"]
    module = None
    if os.environ.get("CHARRNN_CELL_OPS", "1") != "0":
        import tensorflow as tf

        try:
            path = library_path()
            if not path.exists():
                print("lstm_cpu: compiling the LSTM cell ops for this machine (once)", file=sys.stderr, flush=True)
                build(path)
            module = tf.load_op_library(str(path))
        except Exception as error:  # any failure: the Python ops compute the same thing
            print(f"lstm_cpu: compiled cell ops unavailable ({error}); using TensorFlow ops",
                  file=sys.stderr, flush=True)
            module = None
    _loaded["module"] = module
    return module


def runs_sequence(module, matmul_dtype) -> bool:
    """Whether ``module`` (from :func:`load`) has the whole-sequence ops for ``matmul_dtype``:
    float32 always; bfloat16 where the build targets AVX512-BF16 (its kernels are registered only
    there, so one tiny call tells)."""
    import tensorflow as tf

    if module is None or matmul_dtype not in (tf.float32, tf.bfloat16):
        return False
    if matmul_dtype == tf.float32:
        return True
    if "sequence_bfloat16" not in _loaded:
        try:
            with tf.init_scope():  # eager, even when called while a function is traced
                one = tf.ones([1, 16], tf.bfloat16)
                module.charrnn_lstm_sequence_forward(tf.zeros([1, 1, 64]), tf.ones([16, 64], tf.bfloat16),
                                                     one, tf.zeros([1, 16]))
            _loaded["sequence_bfloat16"] = True
        except tf.errors.NotFoundError:  # no bfloat16 kernel in this build
            _loaded["sequence_bfloat16"] = False
    return _loaded["sequence_bfloat16"]
