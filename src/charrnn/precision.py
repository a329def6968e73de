"""``train.precision: auto``: bfloat16 where this kind of processor trains it faster, float32 elsewhere.

The CPU flag does not tell: one AVX512-BF16 Xeon multiplies bf16 at half its fp32 rate, an AVX512-BF16
EPYC at twice it. So ``auto`` measures, once per kind of machine, the LSTM layer's forward and
backward pass at the run's own shape in float32 and in bfloat16, and picks ``mixed_bfloat16`` only
when it is clearly faster (``MIN_SPEEDUP``). The verdict is cached (``~/.cache/charrnn``), so every
run on that machine makes the same choice, and it is printed and logged to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

MIN_SPEEDUP = 1.15
TIMESTEPS = 25


def machine_kind() -> str:
    """What decides the verdict: processor model and flags (or the GPU), TensorFlow's version."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"gpu:{details.get('device_name', 'gpu')}:tf{tf.__version__}"
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")), "")
        cpu = model + ":" + hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    except OSError:
        pass
    return f"cpu:{cpu}:tf{tf.__version__}"


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charrnn" / "precision.json"


def time_lstm(dtype: str, batch: int, inputs: int, units: int, repeats: int = 3) -> float:
    """Median seconds of one fused LSTM forward + backward pass of ``TIMESTEPS`` steps in ``dtype``."""
    import tensorflow as tf

    from charrnn.lstm_cpu import fused_lstm

    rng = tf.random.Generator.from_seed(0)
    x = tf.cast(rng.normal([batch, TIMESTEPS, inputs]), dtype)
    weights = [tf.Variable(rng.normal(shape) * 0.05) for shape in ([inputs, 4 * units], [units, 4 * units], [4 * units])]
    zeros = tf.zeros([batch, units], dtype)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            outputs, _, _ = fused_lstm(x, zeros, zeros, *[tf.cast(w, dtype) for w in weights])
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32))
        return tape.gradient(loss, weights)

    step()  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [g.numpy() for g in step()]
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def resolve(requested: str, batch: int, inputs: int, units: int) -> tuple[str, str]:
    """(policy, why): ``requested`` itself unless it is ``auto``."""
    if requested != "auto":
        return requested, "set in params.yaml"
    kind = machine_kind()
    key = f"{kind}|batch{batch}|in{inputs}|units{units}"
    path = cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        fp32 = time_lstm("float32", batch, inputs, units)
        bf16 = time_lstm("bfloat16", batch, inputs, units)
        cache[key] = {"float32_s": fp32, "bfloat16_s": bf16}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=2, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: measure again next time
    entry = cache[key]
    speedup = entry["float32_s"] / entry["bfloat16_s"]
    policy = "mixed_bfloat16" if speedup >= MIN_SPEEDUP else "float32"
    why = (f"auto: an LSTM step in bfloat16 is {speedup:.2f}x float32's speed on this machine "
           f"({kind.split(':tf')[0]}; measured once, cached in {path})")
    return policy, why
