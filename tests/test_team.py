"""Team setup, run for real: an `mlflow server` on PostgreSQL shared by parallel queued experiments,
a DVC remote round trip to a fresh clone, and clear failures when the server or the remote is gone."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, copy_project, dvc, missing_prerequisite, run, wait_for_queue

pytestmark = pytest.mark.slow

PG = {"host": "127.0.0.1", "port": 5432, "dbname": "test"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_connect():
    import psycopg2

    last = None
    for user in ("postgres", "root"):
        try:
            conn = psycopg2.connect(user=user, connect_timeout=3, **PG)
            conn.autocommit = True
            return conn, user
        except psycopg2.OperationalError as err:
            last = err
    raise last


@contextlib.contextmanager
def postgres_database():
    """A fresh database on the local PostgreSQL, dropped afterwards; yields its SQLAlchemy URL.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3: the URL names psycopg2, the `postgres`
    extra's driver."""
    try:
        import psycopg2
    except ImportError:
        missing_prerequisite("psycopg2 is not installed (pip install -e '.[postgres]')")
    try:
        socket.create_connection((PG["host"], PG["port"]), timeout=3).close()
    except OSError as err:
        missing_prerequisite(f"nothing answers on PostgreSQL's port {PG['host']}:{PG['port']} ({err})")
    try:
        conn, user = _pg_connect()
    except psycopg2.Error as err:  # a server answers: a role, database or password problem is a failure
        pytest.fail(f"PostgreSQL on {PG['host']}:{PG['port']} answers but refused the test: {str(err).strip()}",
                    pytrace=False)
    name = f"charrnn_test_{secrets.token_hex(4)}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{user}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


class MlflowServer:
    """`mlflow server` in its own process group: start, kill (the whole group), start again on the
    same port and database."""

    def __init__(self, backend: str, artifacts: Path, log: Path, port: int | None = None,
                 extra_args: tuple = (), env: dict | None = None):
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.extra_args, self.env = list(extra_args), dict(env or {})
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 180) -> MlflowServer:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
                "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1", *self.extra_args]
        # MLflow's job runner (nine more processes, for its GenAI jobs) is of no use to these runs and
        # costs a core for its first seconds.
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A running `mlflow server` on a fresh PostgreSQL database with local artifacts."""
    with postgres_database() as backend:
        server = MlflowServer(backend, tmp_path / "server-artifacts", tmp_path / "server.log").start()
        try:
            yield server
        finally:
            server.stop()


def test_postgres_tests_skip_only_when_nothing_answers_on_the_port(monkeypatch):
    with postgres_database():  # the real server first: it is there, or this test skips (fails on CI) here
        pass

    def outcome() -> tuple[type, str]:
        try:
            with postgres_database():
                pass
        except (pytest.skip.Exception, pytest.fail.Exception) as err:
            return type(err), str(err)
        raise AssertionError("postgres_database() neither skipped nor failed")

    on_ci = missing_prerequisite.__globals__
    monkeypatch.setitem(on_ci, "ON_CI", False)
    monkeypatch.setitem(PG, "dbname", "charrnn_no_such_database")
    kind, said = outcome()
    assert kind is pytest.fail.Exception and 'database "charrnn_no_such_database" does not exist' in said, said
    monkeypatch.setitem(PG, "port", free_port())
    kind, said = outcome()
    assert kind is pytest.skip.Exception and "nothing answers on PostgreSQL's port" in said, said
    monkeypatch.setitem(on_ci, "ON_CI", True)
    kind, said = outcome()
    assert kind is pytest.fail.Exception and "CI=true and nothing answers on PostgreSQL's port" in said, said


# ---- 1. parallel queued experiments, one shared server with users ------------------------------


def readme_ini() -> str:
    """The README's ``basic_auth.ini`` (Team setup): the test runs the server the README sets up."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.search(r"```ini\n(.*?)```", readme, re.S).group(1)


@pytest.fixture
def auth_server(tmp_path):
    """``mlflow server --app-name basic-auth`` as the README runs it: runs and users on PostgreSQL, the
    admin password from MLFLOW_AUTH_ADMIN_PASSWORD; yields the server with ``admin_password`` set."""
    if importlib.util.find_spec("flask_wtf") is None:
        missing_prerequisite("MLflow's auth app (flask_wtf) is not installed (pip install -e '.[postgres]')")
    with postgres_database() as backend, postgres_database() as users:
        config = tmp_path / "basic_auth.ini"
        config.write_text(re.sub(r"(?m)^database_uri = .*$", f"database_uri = {users}", readme_ini()))
        password = secrets.token_urlsafe(12)
        server = MlflowServer(backend, tmp_path / "server-artifacts", tmp_path / "server.log",
                              extra_args=("--app-name", "basic-auth"),
                              env={"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
        server.admin_password, server.users_database = password, users
        try:
            yield server.start()
        finally:
            server.stop()


def cheap_password_hashes(users_database: str, passwords: dict[str, str]) -> None:
    """Store the users' passwords hashed with one PBKDF2 round: MLflow's basic-auth app checks the
    password of every request several times (werkzeug's scrypt, ~0.1 s of CPU each), which would
    give the server a core of its own for the whole test; the checks themselves stay the same."""
    import psycopg2
    from werkzeug.security import generate_password_hash

    with contextlib.closing(psycopg2.connect(users_database.replace("postgresql+psycopg2://", "postgresql://"))) as conn:
        with conn, conn.cursor() as cur:
            for user, password in passwords.items():
                cur.execute("UPDATE users SET password_hash = %s WHERE username = %s",
                            (generate_password_hash(password, method="pbkdf2:sha256:1"), user))
                assert cur.rowcount == 1, f"no user {user} in the users database"


# -j 2: side by side. "slow-lr" also trains under `mirrored` (one CPU replica here): the strategy's loop,
# with the weights' moving average; "wide" with variational input dropout.
QUEUED = {"wide": ("train.rnn_units=40", "train.input_dropout=0.1", "train.variational_dropout=true"),
          "slow-lr": ("train.learning_rate=0.005", "train.strategy=mirrored", "train.ema_momentum=0.9")}


def test_parallel_queue_records_every_run_on_a_postgres_server_with_users(tmp_path, trained_project, auth_server,
                                                                          monkeypatch):
    import mlflow
    from mlflow.server import get_app_client

    uri = auth_server.uri
    passwords = {"alice": secrets.token_urlsafe(9), "bob": secrets.token_urlsafe(9)}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.admin_password)
    admin = get_app_client("basic-auth", tracking_uri=uri)
    for user, password in passwords.items():
        admin.create_user(user, password)
    cheap_password_hashes(auth_server.users_database, {**passwords, "admin": auth_server.admin_password})
    assert "admin_password" not in readme_ini()  # the password comes from the environment only
    alice = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": passwords["alice"]}
    bob = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": passwords["bob"]}
    for key, value in alice.items():  # this process acts as alice from here on
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("tests")  # alice's: she manages it, bob may only read it (default_permission)

    project = copy_project(trained_project, tmp_path / "project", upto="sequences", overrides={"train": {"epochs": 1}})
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "baseline"], project)
    outputs = ("models", "checkpoints", "metrics", "mlflow.db", "mlruns")
    before = {p: p.stat().st_mtime_ns for o in outputs if (project / o).exists() for p in [project / o, *(project / o).rglob("*")]}
    # No credentials, or a wrong password: one line naming 401 and the fix, before anything is written.
    for env, who in (({"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": ""}, "a client without credentials"),
                     ({**alice, "MLFLOW_TRACKING_PASSWORD": "wrong"}, "user 'alice' with this password")):
        refused = run(TRAIN_ARGV, project, env=env, check=False)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert lines[-1] == (f"error: MLflow tracking server {uri} refused {who} (401 Unauthorized); set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of the server (its "
                             "admin creates users: README, Team setup)"), lines[-1]
    # bob may read alice's experiment but not write to it: 403, one line (checked beside the queue below).
    bobs_try = subprocess.Popen(TRAIN_ARGV, cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **bob})
    _, bob_err = bobs_try.communicate(timeout=300)
    after = {p: p.stat().st_mtime_ns for o in outputs if (project / o).exists() for p in [project / o, *(project / o).rglob("*")]}
    assert after == before  # nothing written by the refused runs
    last = [line for line in bob_err.splitlines() if line.strip()][-1]
    assert bobs_try.returncode == 2 and "Traceback" not in bob_err, bob_err[-2000:]
    assert last.startswith(f"error: MLflow tracking server {uri}: user 'bob' may not write to experiment 'tests' "
                           "(403 Forbidden); ask the server's admin to grant EDIT"), last

    # alice's queued experiments, two at a time, one core each.
    for name, sets in QUEUED.items():
        dvc(project, "exp", "run", "--queue", "-n", name, *[a for s in sets for a in ("-S", s)], env=alice)
    dvc(project, "queue", "start", "-j", "2", env={**alice, "CHARRNN_THREADS": "1"})
    status = wait_for_queue(project)
    assert status.count("Success") == len(QUEUED), status

    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name("tests")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert len(runs) == len(QUEUED) and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs]
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs}
    assert set(by_exp) == set(QUEUED) and all(by_exp[name].info.run_name == name for name in QUEUED)
    assert by_exp["wide"].data.params["train.rnn_units"] == "40"
    assert by_exp["slow-lr"].data.params["train.learning_rate"] == "0.005"
    assert by_exp["slow-lr"].data.params["train.strategy"] == "mirrored"
    assert by_exp["slow-lr"].data.params["train.ema_momentum"] == "0.9"
    assert by_exp["wide"].data.params["train.variational_dropout"] == "True"

    versions = {v.run_id: v for v in client.search_model_versions("name = 'charrnn'")}
    for r in runs:
        assert {"val_loss", "eval_val_loss"} <= set(r.data.metrics), (r.info.run_name, r.data.metrics)
        samples = [f.path for f in client.list_artifacts(r.info.run_id, "samples")]
        assert "samples/epoch_001.txt" in samples, (r.info.run_name, samples)
        assert r.info.run_id in versions, f"{r.info.run_name}: no registered version"
    # The two evaluates crowned concurrently: the alias is on the lowest eval_val_loss (the older of equals).
    scored = [v for v in versions.values() if "eval_val_loss" in v.tags]
    assert len(scored) == len(QUEUED) and len({v.tags["val_split"] for v in scored}) == 1, [v.tags for v in scored]
    best = min(scored, key=lambda v: (float(v.tags["eval_val_loss"]), int(v.version)))
    assert client.get_model_version_by_alias("charrnn", "champion").version == best.version, [
        (v.version, v.tags["eval_val_loss"]) for v in scored]
    # The artifacts went through the server into its --artifacts-destination.
    assert list(auth_server.artifacts.rglob("epoch_001.txt"))
    model = mlflow.pyfunc.load_model("models:/charrnn@champion")
    (text,) = model.predict(["ROMEO: "], params={"length": 20, "seed": 1})
    assert text.startswith("ROMEO: ") and len(text) > len("ROMEO: ")

    # Nothing fell back to the default SQLite store, here or in the queue's temp copies.
    assert not list(project.rglob("mlflow.db")) and not (project / "mlruns").exists()
    # The users live in PostgreSQL, not in a stray SQLite file beside the server.
    assert not list(Path.cwd().glob("basic_auth.db")) and not list(tmp_path.rglob("basic_auth.db"))


# ---- 2. a DVC remote: push, clone, pull, nothing to rerun ---------------------------------------


def test_a_clone_pulls_everything_from_the_remote_and_reruns_nothing(tmp_path, trained_project):
    project = copy_project(trained_project, tmp_path / "project")  # after `dvc repro`
    storage = tmp_path / "storage"
    dvc(project, "remote", "add", "-d", "storage", str(storage))
    dvc(project, "push")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "run and remote"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status").stdout
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro.stdout + repro.stderr, repro.stdout
    generated = run([str(BIN / "charrnn"), "generate", "--model", "models/char_rnn", "--length", "50"], clone)
    assert len(generated.stdout.strip()) >= 50 and "Traceback" not in generated.stderr

    # A remote that does not answer: DVC's own lines, no traceback, a non-zero exit. (A local path
    # under a missing folder is no failure: DVC creates the folders.)
    port = free_port()
    dvc(clone, "remote", "add", "-f", "-d", "storage", f"http://127.0.0.1:{port}/store")
    gone = dvc(clone, "push", check=False)
    output = gone.stdout + gone.stderr
    assert gone.returncode == 1 and "Traceback" not in output, output
    assert f"Cannot connect to host 127.0.0.1:{port}" in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("ERROR: failed to push data to the cloud - ") and last.endswith("failed to upload"), output


# ---- 3. the tracking server goes down mid-training ---------------------------------------------

TRAIN_ARGV = [str(BIN / "python"), "stages/train.py", "--sequences", "data/sequences", "--vocabulary",
              "data/vectorized/vocabulary.json", "--corpus", "data/vectorized/corpus.json", "--model",
              "models/char_rnn", "--checkpoints", "checkpoints/train", "--history", "metrics/history.csv",
              "--run-info", "metrics/train.json"]


def _state(project) -> dict:
    try:
        return json.loads((project / "checkpoints/train/state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_server_that_goes_down_mid_training_fails_in_one_line_and_the_rerun_resumes(
        tmp_path, trained_project, mlflow_server):
    project = copy_project(trained_project, tmp_path / "project", upto="sequences",
                           overrides={"train": {"epochs": 6, "steps_per_epoch": 25, "rnn_units": 48}})

    # A database the stage cannot use: one line in seconds (MLflow alone retries for two minutes).
    wrong_role = f"{mlflow_server.backend.rsplit('@', 1)[0].split('://')[0]}://nobody:secret@127.0.0.1:5432/x"
    started = time.time()
    bad = run(TRAIN_ARGV, project, env={"MLFLOW_TRACKING_URI": wrong_role}, check=False)
    bad_lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and time.time() - started < 60, bad.stderr[-3000:]
    assert bad_lines[-1].startswith("error: MLflow store ") and 'role "nobody" does not exist' in bad_lines[-1]
    assert "secret" not in bad.stderr and "MLFLOW_TRACKING_URI" in bad_lines[-1]
    print(bad_lines[-1])

    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    # Two tries instead of the stage's five (about a minute of back-off) keep the test short.
    env.update(MLFLOW_TRACKING_URI=mlflow_server.uri, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    proc = subprocess.Popen(TRAIN_ARGV, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and "model_file" not in _state(project):
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the server was stopped"
    mlflow_server.stop()
    stopped = time.time()
    out, err = proc.communicate(timeout=600)
    took = time.time() - stopped
    report = f"exit {proc.returncode} after {took:.0f} s\n--- stderr ---\n{err[-4000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in err, report
    assert lines[-1].startswith("error: ") and mlflow_server.uri in lines[-1], report
    assert "rerun" in lines[-1] and "resume" in lines[-1], report
    state = _state(project)
    epoch = state["epoch"]
    assert 1 <= epoch < 6 and (project / "checkpoints/train" / state["model_file"]).is_file(), state
    assert not (project / "models/char_rnn").exists()

    mlflow_server.start()  # the same port and database
    resumed = run(TRAIN_ARGV, project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert f"resuming from epoch {epoch}" in resumed.stdout + resumed.stderr
    assert (project / "models/char_rnn/model.keras").is_file()
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    (finished,) = mlflow.search_runs([mlflow.get_experiment_by_name("tests").experiment_id], output_format="list")
    assert finished.info.status == "FINISHED" and finished.data.tags.get("charrnn.error") is None
    print(f"server down: {lines[-1]}\n(exit {proc.returncode}, {took:.1f} s after the server stopped)")
