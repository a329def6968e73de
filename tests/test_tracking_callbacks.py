"""The logging callbacks' one error policy: a failed MLflow call warns and training goes on; a
tracking server found gone stops the training at the next epoch start, in one line."""

from __future__ import annotations

import socket

import mlflow
import pytest

from charrnn import tracking_outage
from charrnn.errors import UserError
from charrnn.tracking_callbacks import TrackingCallback


def refused(*args, **kwargs):
    raise mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")


@pytest.fixture
def fresh_outage_state(monkeypatch):
    monkeypatch.setattr(tracking_outage, "_server_down", None)


def test_a_failed_logging_call_warns_once_and_training_goes_on(fresh_outage_state, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a store that answers
    callback = TrackingCallback()
    assert callback.record("the epoch sample", refused) is False
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: MLflow: the epoch sample not logged (MlflowException: RESOURCE_DOES_NOT_EXIST")
    assert line.endswith("training goes on")
    callback.on_epoch_begin(1)  # nothing remembered: the next epoch starts
    callback.on_train_end()
    assert callback.record("a metric", lambda: None) is True


def test_a_tracking_server_gone_stops_training_at_the_next_epoch_start(fresh_outage_state, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    callback = TrackingCallback()
    assert callback.record("a metric", refused) is False
    assert capsys.readouterr().err == ""  # no warning: the stop says it all, once
    with pytest.raises(UserError, match=f"MLflow tracking server http://127.0.0.1:{port} stopped answering") as err:
        callback.on_epoch_begin(2)
    assert "\n" not in str(err.value) and "resume" in str(err.value)
    with pytest.raises(UserError):
        callback.on_train_end()
