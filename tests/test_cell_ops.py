"""The compiled LSTM ops (lstm_cpu_ops.cc, built by cell_ops): the same values and gradients as
TensorFlow's ops in float32 and bfloat16, whatever the thread count; built once per machine, compiler
and target (AVX2, AVX-512, AMX), a failed build remembered per compiler."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from charrnn import cell_ops, lstm_fused
from test_lstm_cpu import missing_prerequisite, rel_err



# The subprocesses below import this module's helpers as pytest does: the tests folder on the path.
TESTS_ON_PATH = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


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
        from test_cell_ops import fused_values_and_gradients
        data = np.load({str(tmp_path / "args.npz")!r})
        arrays = [tf.constant(data[f"arr_{{i}}"]) for i in range(len(data.files))]
        dtype = None if {matmul_dtype!r} is None else tf.as_dtype({matmul_dtype!r})
        out = fused_values_and_gradients(arrays[:6], arrays[6:], dtype, "sequence")
        np.savez({str(tmp_path / "out.npz")!r}, *[o.numpy() for o in out])
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **TESTS_ON_PATH, **(env or {})})
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


@pytest.mark.slow  # compiles the ops from scratch (tens of seconds)
def test_sequence_ops_built_for_avx2_match_tensorflow_ops_and_build_once(compiled_ops, tmp_path):
    """The build an AVX2-only machine gets (8-float vectors, smaller tiles; ``CHARRNN_OPS_MARCH=haswell``
    asks for it on any x86-64 CPU with AVX2): the same values and gradients as TensorFlow's ops, as
    this machine's build (above); the library says it was built for AVX2 and the run's kernel line
    says so. Two processes asking for it at once build it once (the other waits and loads it)."""
    if "avx2" not in open("/proc/cpuinfo").read():
        missing_prerequisite("no AVX2 on this machine (every machine the project runs CI on has it)")
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        import numpy as np, tensorflow as tf
        from charrnn import cell_ops, lstm_cpu
        from charrnn.model import build_model
        from test_cell_ops import fused_values_and_gradients, lstm_args, rel_err
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
    env = {**os.environ, **TESTS_ON_PATH, "CHARRNN_OPS_MARCH": "haswell", "XDG_CACHE_HOME": str(tmp_path)}
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


@pytest.mark.slow  # compiles the ops from scratch (tens of seconds)
def test_a_compiler_without_avx512fp16_options_still_builds_for_this_cpu(tmp_path, monkeypatch):
    """GCC 11 refuses -mno-avx512fp16: the build falls back to -march=native, not to a generic build.
    The library's code says so (AVX-512's zmm registers, else AVX2's ymm), not the flags asked for."""
    cpu = open("/proc/cpuinfo").read()
    if "avx2" not in cpu:
        missing_prerequisite("no AVX2 on this machine (every machine the project runs CI on has it)")
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
