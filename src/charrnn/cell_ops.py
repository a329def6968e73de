"""The compiled LSTM ops of ``lstm_cpu_ops.cc``: built once per machine, loaded on demand.

TensorFlow's pip package ships its headers and ``tf.sysconfig`` gives the flags to build ops
against it, so the kernels (one LSTM step's gate arithmetic per direction, and the whole
recurrence per direction) are compiled here, on the user's machine, the first time a
CPU training needs them, and cached beside the train-step timings (``~/.cache/charrnn/ops/<key>/``,
the key covering the source, TensorFlow's version, the machine, the compiler and the target). One process
builds per key (a file lock); the others wait and load its build. Where there is no C++ compiler,
or the build or load fails, :func:`load` returns None with a one-line note (a failed build is
remembered per key) and the fused LSTM runs its Python ops, which compute the same math.
``CHARRNN_CELL_OPS=0`` turns the compiled ops off; ``CHARRNN_OPS_MARCH=haswell`` (any ``-march``
value) builds for that target instead of this CPU, e.g. to run the AVX2 path on an AVX-512 machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from charrnn import machine
from charrnn.errors import first_line

SOURCE = Path(__file__).with_name("lstm_cpu_ops.cc")
MARCH_ENV = "CHARRNN_OPS_MARCH"

_loaded: dict = {}


def cache_dir() -> Path:
    return machine.cache_dir() / "ops"  # beside the train-step timings (autotune)


def requested_target() -> list[str] | None:
    """The target flags ``CHARRNN_OPS_MARCH`` asks for, or None (this CPU's best)."""
    march = os.environ.get(MARCH_ENV, "").strip()
    return [f"-march={march}"] if march else None


COMPILE_TIMEOUT_S = 600  # one compiler run; a hung compiler must not hang the training

# Target flags, best first. -march=native but AVX512-FP16, whose Eigen packet code GCC 12 cannot
# compile; GCC 11 (Ubuntu 22.04, RHEL 9) knows no AVX512-FP16 option at all, so it gets plain
# -march=native (it cannot enable AVX512-FP16 either); only a compiler that cannot target this CPU
# gets the generic build, and says so.
NATIVE_TARGETS = (["-march=native", "-mno-avx512fp16"], ["-march=native"])


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _compiler_identity(compiler: str | None) -> str:
    """The compiler's path and version line: part of the cache key, so installing a newer compiler
    (the advised fix of a failed build) builds again."""
    if compiler is None:
        return "none"
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        version = first_line(result.stdout or result.stderr, "unusable") if result.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        version = "unusable"
    return f"{shutil.which(compiler) or compiler}|{version}"


def library_path() -> Path:
    """Where this machine's build of the ops lives (it may not exist yet)."""
    # machine_kind() names the processor, its flags and TensorFlow's version
    key = hashlib.sha256(SOURCE.read_bytes() + machine.machine_kind().encode() + sys.version.encode()
                         + _compiler_identity(_compiler()).encode()
                         + repr(requested_target()).encode()).hexdigest()[:16]
    return cache_dir() / key / "charrnn_lstm_cell_ops.so"


def _failure_file(library: Path) -> Path:
    return library.with_name("build-failed.txt")


def build(target: Path, flags_for: list[str] | None = None) -> None:
    """Compile the ops into ``target`` (written to a temporary name and renamed). ``flags_for``:
    the target flags to use instead of this CPU's best (e.g. ``["-march=haswell"]``)."""
    import tensorflow as tf

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build.", suffix=".so", dir=target.parent)
    os.close(fd)
    flags = [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    errors = []
    try:
        for target_flags in ([flags_for] if flags_for is not None else [*NATIVE_TARGETS, []]):
            command = [compiler, "-shared", "-fPIC", "-O3", "-w", *target_flags, str(SOURCE), "-o", tmp, *flags]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{Path(compiler).name} did not finish in {COMPILE_TIMEOUT_S} s") from None
            if result.returncode == 0:
                if not target_flags and flags_for is None:  # only the generic build worked: say why once
                    print(f"lstm_cpu: {Path(compiler).name} cannot build for this CPU ({errors[0]}); built the "
                          "generic (slower) ops instead: install a newer g++ or clang++, or set CXX, to get the "
                          "build for this CPU", file=sys.stderr, flush=True)
                # What the library was built for, read back by build_target() (runs record it).
                target.with_name("build.json").write_text(json.dumps(
                    {"flags": target_flags, "compiler": _compiler_identity(compiler)}))
                os.replace(tmp, target)
                return
            lines = result.stderr.strip().splitlines()
            errors.append(next((line for line in lines if "error" in line),
                               lines[-1] if lines else f"exit status {result.returncode}, no message")
                          .strip())
        raise RuntimeError(f"{Path(compiler).name} failed: {errors[0]}")  # the native build's reason
    finally:
        Path(tmp).unlink(missing_ok=True)


def _isa(library: str | Path) -> str:
    """The instruction set ``library`` was compiled for, as its ``charrnn_ops_isa()`` says. Only
    for a library TensorFlow has loaded: a first dlopen here would register its ops outside
    ``tf.load_op_library``, which would then find none."""
    function = ctypes.CDLL(str(library)).charrnn_ops_isa
    function.restype = ctypes.c_char_p
    return function().decode()


def load():
    """The loaded op module (``.charrnn_lstm_cell_forward``/``_backward``), or None if unavailable."""
    if "module" in _loaded:
        return _loaded["module"]
    module = None
    if os.environ.get("CHARRNN_CELL_OPS", "1") != "0":
        import tensorflow as tf

        try:
            path = _built_library()
            module = tf.load_op_library(str(path))
            _loaded["path"] = path
        except Exception as error:  # any failure: the Python ops compute the same thing
            print(f"lstm_cpu: compiled cell ops unavailable ({' '.join(str(error).split())}); using "
                  "TensorFlow ops", file=sys.stderr, flush=True)
            module = None
    _loaded["module"] = module
    return module


def build_target() -> dict | None:
    """The loaded build's target flags, compiler and instruction set (``{"flags": [...], "compiler":
    ..., "isa": "AVX-512"}``), or None."""
    if load() is None:
        return None
    path = _loaded.get("path") or library_path()
    try:
        build = json.loads(path.with_name("build.json").read_text())
    except (OSError, ValueError):
        build = {"flags": ["?"], "compiler": _compiler_identity(_compiler())}
    return {**build, "isa": _isa(path)}


def _built_library() -> Path:
    """This machine's build: made once per cache key by whichever process gets the lock first (the
    others wait, then load it); a failed build is remembered there, so the next process says why
    without compiling again until the compiler, the source or TensorFlow change."""
    path = library_path()
    failed = _failure_file(path)
    if not path.exists() and not failed.exists():
        with machine.locked(path.with_name(".build.lock")):
            if not path.exists() and not failed.exists():
                print("lstm_cpu: compiling the LSTM cell ops for this machine (once)", file=sys.stderr, flush=True)
                try:
                    build(path, requested_target())
                except (RuntimeError, OSError) as error:
                    with contextlib.suppress(OSError):  # an unwritable cache: said again next time
                        failed.write_text(" ".join(str(error).split()) + "\n")
                    raise
    if failed.exists() and not path.exists():
        raise RuntimeError(f"{failed.read_text().strip()} (remembered in {failed}; delete it to try again)")
    return path


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
