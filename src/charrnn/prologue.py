"""What a stage does before its work, in the order that fails fastest: its leftovers swept, the
environment and any given checks (the tracking server) passed in a second or less, and only then
TensorFlow loaded (~10 s), quietly, with its thread pools set before its runtime starts.

The checks are passed in, not imported here: every import of a stage is a rerun edge (dvc.yaml), and
`sequences` must not rerun when the tracking code changes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

from charrnn.files import remove_leftovers
from charrnn.quiet import importing_tensorflow, quiet_python_logs
from charrnn.threads import configure_threads, threads_from_env


def before_tensorflow(*outputs: Path | None, checks: Iterable[Callable[[], object]] = ()) -> None:
    """Sweep ``outputs``' temporary leftovers, then run ``checks`` and read CHARRNN_THREADS (each
    fails in one line before TensorFlow loads)."""
    remove_leftovers(*[out for out in outputs if out is not None])
    for check in checks:
        check()
    threads_from_env()


# Keras imports scikit-learn (for its wrappers) and matplotlib (for its image plots) whenever they are
# installed, and MLflow installs both: about 2 s of the ~9 s TensorFlow takes to load on a 2-core AVX2
# CPU, for features no stage uses. Keras guards both imports with `except ImportError`, so they are
# refused while TensorFlow loads (a None in sys.modules makes an import raise ModuleNotFoundError);
# whatever imports them later (MLflow) gets them as usual.
KERAS_EXTRAS_UNUSED = ("sklearn", "matplotlib")


@contextlib.contextmanager
def without_keras_extras():
    """Refuse KERAS_EXTRAS_UNUSED to imports in the block (those already loaded stay loaded)."""
    refused = [name for name in KERAS_EXTRAS_UNUSED if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in refused:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


# TensorFlow's default CPU allocator takes every large tensor from malloc, which maps it fresh and
# unmaps it on free: the default training faulted in 58 million pages (257 s of system time in an
# 18-minute run on a 2-core AVX2 EPYC). Its BFC allocator keeps and reuses freed memory: 11-14x fewer page
# faults and about a fifth less CPU time a train step there (benchmarks/RESULTS.md). The environment
# variable is TensorFlow's own; a user's setting wins.
BFC_ALLOCATOR = ("TF_CPU_ALLOCATOR_USE_BFC", "true")


@contextlib.contextmanager
def loading_tensorflow(*configure: Callable[[], object]):
    """Import TensorFlow in the block (its C++ start-up chatter filtered, Keras' unused extras not
    loaded, its CPU tensors from the BFC allocator unless TF_CPU_ALLOCATOR_USE_BFC says otherwise),
    then quiet MLflow's and Keras' Python logs, set the thread pools and run ``configure`` (e.g. the
    logical CPUs)."""
    os.environ.setdefault(*BFC_ALLOCATOR)
    with importing_tensorflow(), without_keras_extras():
        yield
    quiet_python_logs()
    configure_threads()
    for step in configure:
        step()
