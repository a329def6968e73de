"""Fault injection for the kill tests: die with SIGKILL at a named instant of the training protocol.

``CHARRNN_CRASH_AT=<point>`` kills the process the first time it reaches ``<point>`` (with
``<point>@<n>``, the n-th time), exactly as ``kill -9`` would, so the tests can land a kill inside
the checkpoint commit and the final save, not only where a timer happens to fall. Unset, it costs
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("CHARRNN_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
