"""MLflow runs: what a run is named and tagged with, where it came from, and how a stage finds it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from charrnn.errors import UserError
from charrnn.tracking_store import repo_root

# mlflow is imported where it is used, as in tracking_store.

MODEL_HASH_TAG = "charrnn.model_sha256"
RESUME_KEY_TAG = "charrnn.resume_key"
ERROR_TAG = "charrnn.error"  # why the training run failed or was interrupted
SUPERSEDED_BY_TAG = "charrnn.superseded_by"  # on an abandoned run: the run that trained instead
EVALUATE_ERROR_TAG = "charrnn.evaluate_error"  # why the last evaluate of the run's model failed


# ---- what a run is and where it came from ---------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def source_tags() -> dict[str, str]:
    """Tags that lead from a run back to its git commit and DVC experiment."""
    tags = {}
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.commit"] = commit
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags["dvc.root"] = str(repo_root())
    return tags


def baseline_params(params_file: Path, sections: tuple[str, ...]) -> tuple[str | None, dict]:
    """The commit a run is compared to (the DVC experiment's baseline, else HEAD) and its params
    of ``sections``, flat and with defaults filled in (``{"train.rnn_units": 1024, ...}``)."""
    from charrnn.config import as_flat_dict, parse_section

    rev = os.environ.get("DVC_EXP_BASELINE_REV") or (_git("rev-parse", "HEAD") or "").strip() or None
    text = _git("show", f"{rev}:{Path(params_file).as_posix()}") if rev else None
    try:
        raw = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict):
        return rev, {}
    flat = {}
    for section in sections:
        try:
            flat.update(as_flat_dict(section, parse_section(section, raw.get(section))))
        except UserError:  # the baseline's params were invalid: compare what can be compared
            continue
    return rev, flat


def changed_params(current: dict, baseline: dict) -> dict[str, tuple]:
    """``{"train.rnn_units": (1024, 256), ...}``: flat keys whose value differs from the baseline."""
    if not baseline:
        return {}
    return {k: (baseline.get(k, "<unset>"), v) for k, v in current.items() if baseline.get(k, "<unset>") != v}


def run_description(changed: dict[str, tuple], rev: str | None) -> str:
    """``mlflow.note.content``: what this run changes against its baseline, in a line or two."""
    base = f"commit {rev[:7]}" if rev else "the committed params.yaml"
    if not changed:
        return f"Baseline: the params of {base}."
    parts = [f"{k} {before} → {after}" if before != "<unset>" else f"{k} = {after}"
             for k, (before, after) in sorted(changed.items())]
    return f"Against {base}: " + ", ".join(parts) + "."


def run_name(experiment_id: str, changed: dict[str, tuple], rev: str | None) -> str:
    """The DVC experiment's name inside ``dvc exp run``; else the short commit and the changed params.

    Never the name of another run of the experiment: a repeated name gets ``-2``, ``-3``...
    """
    import mlflow

    base = os.environ.get("DVC_EXP_NAME")
    if not base:
        base = rev[:7] if rev else "run"
        if changed:
            base += " " + " ".join(f"{k.split('.', 1)[1]}={after}" for k, (_, after) in sorted(changed.items()))
        base = base[:200]
    taken = {r.info.run_name for r in mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", run_view_type=mlflow.entities.ViewType.ALL,
        max_results=50000)}
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


# ---- finding runs -------------------------------------------------------------------------------


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


def active_run_exists(run_id: str) -> bool:
    """True for a run in the store that has not been deleted (a deleted run cannot be resumed)."""
    import mlflow

    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def error_text(err: BaseException) -> str:
    """An exception as a tag value (MLflow caps tags at 5,000 characters)."""
    return f"{type(err).__name__}: {err}"[:5000]


def delete_tag(run_id: str, key: str) -> None:
    """Remove a run's tag if it has one (a finished resume or evaluate clears its stale error)."""
    import mlflow

    client = mlflow.MlflowClient()
    if key in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, key)


def end_abandoned_run(run_id: str) -> None:
    """End a run whose checkpoint cannot be resumed (its params changed): KILLED, with a note.
    Without this it would stay RUNNING forever beside the new run."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return  # deleted or from another store: nothing to close
    if run.info.status != "RUNNING" or run.info.lifecycle_stage != "active":
        return
    client.set_tag(run_id, ERROR_TAG, "abandoned: its checkpoint could not be resumed (the params changed); "
                                      "the training restarted from scratch in a new run")
    client.set_terminated(run_id, status="KILLED")
    print(f"MLflow run {run_id} of the interrupted training ended KILLED: its checkpoint does not match "
          "these params; starting a new run", flush=True)


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which the run holds metric ``key`` (a resume logs only later ones)."""
    import mlflow

    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)}
