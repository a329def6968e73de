"""The tracking names a training or evaluate run calls as ``tracking.<name>``, in one namespace.

Nothing is defined here; each name lives in the module named for its concern, and new code imports
it from there:

* ``tracking_store``: where runs are stored, the preflight, the experiment (``setup``);
* ``tracking_databases``: an SQLite file or database store that cannot be used;
* ``tracking_runs``: run names, tags, lookups;
* ``tracking_outage``: a tracking server that stops answering during training;
* ``corpus_dataset``: the corpus as an MLflow dataset, and logging it as a run's input;
* ``tracking_callbacks``: the Keras callbacks that log while training, and their error policy.
"""

from __future__ import annotations

from charrnn.corpus_dataset import corpus_dataset, log_corpus_input
from charrnn.tracking_outage import end_run_with_error, raise_if_server_down, server_down_error
from charrnn.tracking_runs import (
    ERROR_TAG,
    EVALUATE_ERROR_TAG,
    MODEL_HASH_TAG,
    RESUME_KEY_TAG,
    SUPERSEDED_BY_TAG,
    active_run_exists,
    baseline_params,
    changed_params,
    delete_tag,
    end_abandoned_run,
    error_text,
    find_run,
    logged_steps,
    run_description,
    run_name,
    source_tags,
)
from charrnn.tracking_store import PRIMARY_METRIC, check_server, repo_root, server_answers, setup, tracking_uri

__all__ = [
    "ERROR_TAG", "EVALUATE_ERROR_TAG", "MODEL_HASH_TAG", "PRIMARY_METRIC", "RESUME_KEY_TAG", "SUPERSEDED_BY_TAG",
    "active_run_exists", "baseline_params", "changed_params", "check_server", "corpus_dataset", "delete_tag",
    "end_abandoned_run", "end_run_with_error", "error_text", "find_run", "log_corpus_input", "logged_steps",
    "raise_if_server_down",
    "repo_root", "run_description", "run_name", "server_answers", "server_down_error", "setup", "source_tags",
    "tracking_uri",
]
