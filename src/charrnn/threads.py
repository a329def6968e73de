"""CPU threads per stage: ``CHARRNN_THREADS`` sizes TensorFlow's thread pools;
``CHARRNN_CPU_REPLICAS`` splits the CPU into logical devices for ``train.strategy: mirrored``.

By default TensorFlow uses every core for each op (intra-op) and runs ops side by side on another
pool (inter-op). Two experiments run in parallel (``dvc queue start -j 2``) would each claim every
core and slow each other down; ``CHARRNN_THREADS=<cores / workers>`` gives each its share. The
setting says how a stage runs, not what it computes, so it is an environment variable, not a param.
"""

from __future__ import annotations

import os

from charrnn.errors import UserError

ENV = "CHARRNN_THREADS"
REPLICAS_ENV = "CHARRNN_CPU_REPLICAS"


def _positive_count(name: str, what: str, example: str) -> int | None:
    """The environment variable ``name`` as a positive count, None when unset; one line naming it
    and ``example`` otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{name} must be a positive number of {what}, got {value!r}; e.g. {example}")
    return int(value)


def threads_from_env() -> int | None:
    return _positive_count(ENV, "threads", f"{ENV}=$(( $(nproc) / 2 )) for two parallel experiments")


def cpu_replicas_from_env() -> int | None:
    return _positive_count(REPLICAS_ENV, "logical CPU devices",
                           f"{REPLICAS_ENV}=2 to run train.strategy: mirrored on two CPU replicas")


def configure_cpu_replicas() -> int | None:
    """Apply ``CHARRNN_CPU_REPLICAS=n``: the CPU becomes n logical devices, so that ``mirrored``
    without a GPU runs n replicas (on one CPU's cores: for testing the multi-replica path, not for
    speed). Call before TensorFlow initialises its devices; returns n or None."""
    replicas = cpu_replicas_from_env()
    if replicas and replicas > 1:
        import tensorflow as tf

        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas)
    return replicas


def configure_threads() -> int | None:
    """Apply ``CHARRNN_THREADS`` (call before TensorFlow runs its first op); returns it or None."""
    threads = threads_from_env()
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        print(f"{ENV}={threads}: TensorFlow uses {threads} thread(s) per pool", flush=True)
    return threads
