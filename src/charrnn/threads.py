"""CPU threads per stage: ``CHARRNN_THREADS`` sizes TensorFlow's thread pools.

By default TensorFlow uses every core for each op (intra-op) and runs ops side by side on another
pool (inter-op). Two experiments run in parallel (``dvc queue start -j 2``) would each claim every
core and slow each other down; ``CHARRNN_THREADS=<cores / workers>`` gives each its share. The
setting says how a stage runs, not what it computes, so it is an environment variable, not a param.
"""

from __future__ import annotations

import os

from charrnn.errors import UserError

ENV = "CHARRNN_THREADS"


def threads_from_env() -> int | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{ENV} must be a positive number of threads, got {value!r}; e.g. "
                        f"{ENV}=$(( $(nproc) / 2 )) for two parallel experiments")
    return int(value)


def configure_threads() -> int | None:
    """Apply ``CHARRNN_THREADS`` (call before TensorFlow runs its first op); returns it or None."""
    threads = threads_from_env()
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        print(f"{ENV}={threads}: TensorFlow uses {threads} thread(s) per pool", flush=True)
    return threads
