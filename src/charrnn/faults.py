"""Fault injection for the kill tests: a signal at a named instant of the training protocol.

``CHARRNN_CRASH_AT=<point>`` sends the process SIGKILL the first time it reaches ``<point>`` (with
``<point>@<n>``, the n-th time in this process), exactly as ``kill -9`` would, so the tests can land
a kill inside the checkpoint commit and the final save, not only where a timer happens to fall.
``CHARRNN_CRASH_SIGNAL=TERM`` (or ``INT``) sends that signal instead, which the stage handles as one
sent from outside. The point ``train-step`` is each optimizer step of Keras' fit (``step_callbacks``):
mid-epoch at a step the test names, however fast the machine. Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def _wanted() -> tuple[str, int]:
    point, _, nth = os.environ.get("CHARRNN_CRASH_AT", "").partition("@")
    return point, int(nth or 1)


def crash_point(name: str) -> None:
    point, nth = _wanted()
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == nth:
        os.kill(os.getpid(), signal.Signals[f"SIG{os.environ.get('CHARRNN_CRASH_SIGNAL', 'KILL')}"])


def step_callbacks() -> list:
    """A Keras callback reaching ``train-step`` after each batch, only while that point is asked for
    (a batch hook costs fit a sync of its logs every step)."""
    if _wanted()[0] != "train-step":
        return []
    import keras

    class TrainStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            crash_point("train-step")

    return [TrainStep()]
