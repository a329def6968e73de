"""Quiet stages: keep the native libraries' start-up chatter out of what a user reads.

TensorFlow 2.21 prints, from C++ while its shared libraries load, absl's "All log messages before
absl::InitializeLog()" notice, the oneDNN note and "Could not find cuda drivers" (twice, once per
library), and ``TF_CPP_MIN_LOG_LEVEL`` no longer silences them. ``importing_tensorflow()`` catches
file descriptor 2 while TensorFlow and Keras load and replays every line that is not one of those
known notices, so real warnings and errors still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

CHATTER = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|^[IWE]\d{4} [\d:.]+ +\d+ (port\.cc|cudart_stub\.cc|cuda_executor\.cc|cuda_dnn\.cc|cpu_feature_guard\.cc"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit)"
    r"|^To enable the following instructions: .*rebuild TensorFlow"
)


@contextlib.contextmanager
def importing_tensorflow():
    """Filter fd 2 (C++ writes there directly) while the block imports TensorFlow/Keras, and keep
    TensorFlow's C++ log to errors that matter from then on (``TF_CPP_MIN_LOG_LEVEL=3`` unless set:
    its CPU feature notes and "failed call to cuInit" on machines without a GPU hide the lines that
    matter; set it to 0 to see them again)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
            if "tensorflow" in sys.modules:  # device discovery: "failed call to cuInit" without a GPU
                sys.modules["tensorflow"].config.list_physical_devices("GPU")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not CHATTER.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def quiet_python_logs() -> None:
    """MLflow's INFO lines (store migrations, system-metrics monitor), its download progress bars
    and its advice to log an input example (we give the signature ourselves), and Keras'
    warning that a tf.data stream ignores ``shuffle=True`` (the stream is shuffled by its own seed)."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=r"`shuffle=True` was passed")
    warnings.filterwarnings("ignore", message=r".*An input example was not provided")
