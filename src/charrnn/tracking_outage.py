"""A tracking server that stops answering during training: found once, training stopped at the next
epoch start (after that epoch's checkpoint), the run ended without MLflow's retries, one line naming
the fix. ``tracking_callbacks`` states the whole policy; ``tracking_store.setup`` sets the retries.
"""

from __future__ import annotations

import contextlib
import logging
import os

from charrnn import seams
from charrnn.errors import UserError
from charrnn.tracking_runs import ERROR_TAG, error_text
from charrnn.tracking_store import server_answers, tracking_uri

_server_down: str | None = None  # the server's URI once a logging call found it gone


def logging_failed(err: Exception) -> bool:
    """A logging call raised ``err``: True when the tracking server is gone, which is remembered (the
    training stops at the next epoch start, after this epoch's checkpoint, see
    ``raise_if_server_down``); False when the store still answers (the call itself failed)."""
    global _server_down
    if _server_down:
        return True
    uri = tracking_uri()
    if server_answers(uri):
        return False
    _server_down = uri
    return True


def raise_if_server_down() -> None:
    if _server_down:
        raise server_down_error(_server_down)


def server_down_error(uri: str) -> UserError:
    return UserError(
        f"MLflow tracking server {uri} stopped answering during training; the checkpoint of the last "
        "completed epoch is kept: restart the server, then rerun the same command (or `dvc repro`) to "
        "resume from it"
    )


def end_run_with_error(err: BaseException) -> UserError | None:
    """End the active run FAILED (KILLED after a signal) with the error in tag ``charrnn.error``.

    When the tracking server is gone nothing can be recorded: the run is ended here without
    waiting for MLflow's retries (it stays RUNNING on the server; the rerun resumes into it), the
    metrics still queued for the server are dropped (with MLflow's error lines about them), and the
    error to raise instead of ``err`` is returned: one line naming the fix. Otherwise None.
    """
    import mlflow

    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    uri = _server_down or tracking_uri()
    if _server_down or not server_answers(uri):
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        logging.getLogger("mlflow").setLevel(logging.CRITICAL)
        run = mlflow.active_run()
        with contextlib.suppress(Exception):
            mlflow.flush_async_logging()
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)  # takes the run off MLflow's stack; the server call fails at once
        monitor = seams.pop_system_metrics_monitor(run.info.run_id) if run else None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        return None if isinstance(err, KeyboardInterrupt) else server_down_error(uri)
    mlflow.set_tag(ERROR_TAG, error_text(err))
    mlflow.end_run(status=status)
    return None
