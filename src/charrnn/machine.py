"""What kind of machine this is, and where per-machine results are cached.

The compiled LSTM ops (:mod:`charrnn.cell_ops`) and the timings behind ``auto`` precision and LSTM
path (:mod:`charrnn.autotune`) both depend on the processor and TensorFlow's version, so both are
cached per machine kind under one folder, ``$XDG_CACHE_HOME/charrnn`` (``~/.cache/charrnn``).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import filelock


def machine_kind() -> str:
    """Processor model and flags (or the GPU), and TensorFlow's version."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"gpu:{details.get('device_name', 'gpu')}:tf{tf.__version__}"
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the processor's name only
        return f"cpu:{cpu}:tf{tf.__version__}"
    field = lambda name, default: next(  # noqa: E731
        (line.split(":", 1)[1] for line in info.splitlines() if line.startswith(name)), default)
    flags = " ".join(sorted(field("flags", "").split()))
    cpu = field("model name", cpu).strip() + ":" + hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"cpu:{cpu}:tf{tf.__version__}"


_cache: dict[Path, Path] = {}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/charrnn``, else ``~/.cache/charrnn``, created. Where that folder cannot be
    created or written, a temporary folder for this process, with one note saying so: training
    still runs, but builds the ops and times the train step again every run."""
    wanted = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charrnn"
    if wanted not in _cache:
        try:
            wanted.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=wanted).close()
            _cache[wanted] = wanted
        except OSError as error:
            fallback = Path(tempfile.mkdtemp(prefix="charrnn-cache-"))
            atexit.register(shutil.rmtree, fallback, ignore_errors=True)
            print(f"charrnn: cannot write the cache folder {wanted} ({error.strerror or error}): the compiled "
                  "ops and the train-step timings are made again every run; set XDG_CACHE_HOME to a writable "
                  "folder to keep them", file=sys.stderr, flush=True)
            _cache[wanted] = fallback
    return _cache[wanted]


def locked(path: Path) -> filelock.FileLock:
    """An exclusive lock on ``path`` (created if missing, its folder too) across processes, held
    while a ``with`` block runs: ``flock`` on Linux and macOS, so a killed holder's lock goes with
    its process. ``preserve_lock_file``: where ``flock`` is missing, fail (the caller's OSError
    path) instead of filelock's marker-file fallback, which a killed holder would leave locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(path, preserve_lock_file=True)
