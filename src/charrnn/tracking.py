"""MLflow: where runs are stored, how a stage finds its run, and what every run is tagged with.

The default store is ``sqlite:///<repository root>/mlflow.db`` with artifacts in
``<repository root>/mlruns``. The root comes from ``DVC_ROOT``, which DVC sets for every stage,
also inside a queued ``dvc exp run`` whose working directory is a throw-away copy; so runs never
vanish with that copy. ``MLFLOW_TRACKING_URI`` overrides the store.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from charrnn.errors import UserError

# mlflow is imported where it is used: `check_server` runs before the heavy imports of a stage.

MODEL_HASH_TAG = "charrnn.model_sha256"
RESUME_KEY_TAG = "charrnn.resume_key"


def repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after an hour of training, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI"
        ) from None


def check_server() -> None:
    """A stopped tracking server fails the stage in a second, before TensorFlow loads."""
    _check_reachable(tracking_uri())


def setup(experiment_name: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created if needed)."""
    import mlflow

    uri = tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        # Absolute, so artifacts land in the real repository even from a temp experiment copy.
        artifact_location = (repo_root() / "mlruns").as_uri()
    return mlflow.create_experiment(experiment_name, artifact_location=artifact_location)


def source_tags() -> dict[str, str]:
    """Tags that lead from a run back to its git commit and DVC experiment."""
    tags = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
        tags["git.commit"] = commit
    except (OSError, subprocess.CalledProcessError):
        pass
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags["dvc.root"] = str(repo_root())
    return tags


def find_run(experiment_id: str, tag: str, value: str):
    """The most recent run of the experiment whose ``tag`` equals ``value`` (or None)."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{tag}` = '{value}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False
