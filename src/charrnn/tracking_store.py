"""MLflow's store: where runs are stored, the preflight that proves it usable, and the experiment.

The default store is ``sqlite:///<repository root>/mlflow.db`` with artifacts in
``<repository root>/mlruns``. The root comes from ``DVC_ROOT``, which DVC sets for every stage,
also inside a queued ``dvc exp run`` whose working directory is a throw-away copy; so runs never
vanish with that copy. ``MLFLOW_TRACKING_URI`` overrides the store.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from charrnn import seams
from charrnn.errors import UserError, first_line
from charrnn.quiet import quiet_python_logs
from charrnn.tracking_databases import check_database, check_sqlite_file, fix_hint
from charrnn.urls import is_http_url

# mlflow is imported where it is used: `check_server` runs before the heavy imports of a stage
# (for a tracking server it imports MLflow's client, never TensorFlow).

PRIMARY_METRIC = "eval_val_loss"  # evaluate's whole-split loss: what runs are ranked by

# MLflow retries a failed request 7 times by default (about 4 minutes of back-off, per request). With
# 5 (0 + 4 + 8 + 16 + 32 s, about a minute) a server restart is still ridden out, while a server that
# is gone stops the training a minute later, not many minutes. MLFLOW_HTTP_REQUEST_MAX_RETRIES wins.
SERVER_RETRIES = "5"


def repo_root() -> Path:
    """The repository: ``DVC_ROOT`` inside a stage, else git's top level, else the working folder."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the repository's ``mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


# ---- the preflight: a tracking server asked once, through MLflow's own HTTP client ----------------

# MLflow's client reads MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_AUTH,
# MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_CLIENT_CERT_PATH and MLFLOW_TRACKING_INSECURE_TLS (and
# ~/.mlflow/credentials): a request of our own would honour none of them and refuse servers MLflow reaches.
# The checks send what the client sends (``seams.ask_tracking_server``: the REST store's request and
# host credentials), with no retries (MLflow's back-off takes minutes) and the status read from the answer itself:
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
    return is_http_url(uri)


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

    creds = seams.client_credentials()  # the variables, else ~/.mlflow/credentials
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
    reason = first_line(innermost)
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
        message = first_line(str(body.get("message", "")))
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
    endpoint, method = seams.search_experiments_endpoint()
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        path = os.environ.get(name)
        if path and not Path(path).is_file():
            raise UserError(f"{name}={path}: no such file; point it at the certificate (PEM) or unset it")
    try:
        response = seams.ask_tracking_server(uri, endpoint, method, timeout, json={"max_results": 1})
    except Exception as err:  # noqa: BLE001 - no HTTP answer: say why in one line
        raise _transport_error(uri, err, timeout) from None
    error = _answer_error(uri, response, endpoint, method)
    if error is not None:
        raise error


# How each store words the error of an insert that lost a race to an equal row.
_DUPLICATE_KEY = ("duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def retry_lost_insert(call, tries: int = 3):
    """``call()``, again where it failed because a concurrent writer inserted the same row first (two
    runs starting at once against one store: queued experiments, two teammates). MLflow's stores
    insert a missing tag or dataset without a lock, so the slower insert fails on the unique key;
    by then the row exists, and the same call updates or links it."""
    import mlflow

    for attempt in range(1, tries + 1):
        try:
            return call()
        except mlflow.exceptions.MlflowException as err:
            if attempt == tries or not any(words in str(err) for words in _DUPLICATE_KEY):
                raise
            time.sleep(0.1 * attempt)


def _check_can_write(experiment_id: str, experiment_name: str) -> None:
    """On a server with permissions, a user who may only read the experiment stops here, before
    training: rewriting one of its tags with the same value needs the EDIT permission a run does."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        retry_lost_insert(lambda: client.set_experiment_tag(experiment_id, "mlflow.experimentKind",
                                                           "custom_model_development"))
    except mlflow.exceptions.MlflowException as err:
        if "403" in str(err) or getattr(err, "error_code", "") == "PERMISSION_DENIED":
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "?")
            raise UserError(
                f"MLflow tracking server {tracking_uri()}: user '{user}' may not write to experiment "
                f"'{experiment_name}' (403 Forbidden); ask the server's admin to grant EDIT on it "
                "(README, Team setup), or set mlflow.experiment to an experiment of your own") from None
        raise


def check_server() -> None:
    """A stopped tracking server or a damaged store fails the stage in a second, before TensorFlow loads."""
    uri = tracking_uri()
    _check_server_answers(uri)
    check_sqlite_file(uri)


def setup(experiment_name: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created if needed).

    The experiment is a model-training one (the UI opens on its runs, not on GenAI traces) ranked
    by evaluate's whole-split validation loss, lower is better. Any failure of the store is one line.
    """
    import mlflow

    quiet_python_logs()  # the store's migrations log at INFO (before TensorFlow loads, where stages call this)
    uri = tracking_uri()
    from_env = "MLFLOW_TRACKING_URI" in os.environ  # before MLflow sets it itself
    check_server()
    check_database(uri)
    if is_http_url(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", SERVER_RETRIES)
    # Unbuffered, MLflow's async-logging thread polls its queue with a one-second timeout, so every
    # flush (one per epoch, before the checkpoint) and the run's end idle up to a second each;
    # buffered, it waits on its stop event and a flush returns at once.
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
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
        if is_http_url(uri):
            _check_can_write(experiment.experiment_id, experiment_name)
        for key, value in wanted.items():
            if experiment.tags.get(key) != value:
                retry_lost_insert(lambda: client.set_experiment_tag(experiment.experiment_id, key, value))
        return experiment.experiment_id
    except UserError:
        raise
    except Exception as err:  # the store's own failure (driver missing, not a database, bad scheme...)
        first = first_line(err)
        raise UserError(f"MLflow store {uri} cannot be used ({type(err).__name__}: {first[:200]}); "
                        f"{fix_hint(from_env)}") from None


def server_answers(uri: str | None = None, timeout: float = 3.0) -> bool:
    """True unless ``uri`` is a tracking server that does not answer ``GET /health`` with 200 (one try,
    through MLflow's client, so with its credentials and TLS settings)."""
    uri = uri or tracking_uri()
    if not _is_server(uri):
        return True
    try:
        return seams.ask_tracking_server(uri, "/health", "GET", timeout).status_code == 200
    except Exception:  # noqa: BLE001 - no answer at all
        return False
