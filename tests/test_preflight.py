"""The tracking preflight goes through MLflow's client: a real `mlflow server` behind a loopback front
that demands a bearer token (or a Basic user), and behind an HTTPS front with a certificate of its own;
then each kind of answer (or none) from a scripted server, named in one line."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from charrnn import tracking_store as tracking
from charrnn.errors import UserError
from conftest import BIN, REPO

TOKEN = "s3cret-token"
USER, PASSWORD = "alice", "right-password"
CLIENT_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_INSECURE_TLS",
                    "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "DVC_ROOT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` on SQLite for the module (it takes seconds to start); yields its port."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, process_group=0,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"mlflow server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"mlflow server not healthy in 180 s:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
            time.sleep(0.2)  # polling for readiness, with the deadline above
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


class Forward(http.server.BaseHTTPRequestHandler):
    """Passes every request on to the server, unless it lacks an accepted ``Authorization``: then
    401 as MLflow's auth app answers it (a text body)."""

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(30)
            self.request.do_handshake()  # here, in the request's thread, not in the accepting one
        super().setup()

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.accepted and self.headers.get("Authorization") not in self.server.accepted:
            return self.reply(401, [("WWW-Authenticate", 'Bearer realm="mlflow"')], b"You are not authenticated.")
        skip = ("host", "authorization", "connection", "content-length")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.server.forwarded += 1
        kept = [(k, v) for k, v in response.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")]
        self.reply(response.status, kept, data)

    def reply(self, status, headers, data):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = forward

    def log_message(self, *args):
        pass


class Front(http.server.ThreadingHTTPServer):
    """A reverse proxy on 127.0.0.1 (a random port) in front of the MLflow server."""

    daemon_threads = True

    def __init__(self, upstream_port: int, accepted: set[str] | None = None, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), Forward)
        self.upstream_port, self.accepted, self.tls = upstream_port, accepted, tls
        self.forwarded = 0  # requests that reached the server
        self.uri = f"{'https' if tls else 'http'}://127.0.0.1:{self.server_port}"

    def get_request(self):
        sock, address = super().get_request()
        if self.tls:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return  # a client that does not trust the certificate ends the handshake: expected here
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(front: Front):
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        front.shutdown()
        front.server_close()
        thread.join(timeout=10)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def auth_front(mlflow_server):
    """The server behind a front that takes ``Bearer TOKEN`` or alice's Basic credentials."""
    with serving(Front(mlflow_server, accepted={f"Bearer {TOKEN}", basic(USER, PASSWORD)})) as front:
        yield front


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"charrnn test {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_front(mlflow_server, tmp_path_factory):
    """The server behind an HTTPS front whose certificate no system CA signed; yields (front, its cert,
    another CA's cert)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder, "server")
    other, _ = self_signed(folder, "other")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with serving(Front(mlflow_server, tls=context)) as front:
        yield front, cert, other


@pytest.fixture(autouse=True)
def client_env(monkeypatch, tmp_path):
    """Only the variables a test sets reach MLflow's client: no credentials or CA bundles of this
    machine, no ~/.mlflow/credentials, no HTTP proxy for the loopback fronts."""
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_a_bearer_token_server_lets_the_right_token_in_and_stops_a_wrong_one_in_one_line(auth_front, monkeypatch,
                                                                                          tmp_path):
    uri = auth_front.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    forwarded = auth_front.forwarded
    tracking.check_server()
    assert auth_front.forwarded > forwarded  # the check went through the front to the server
    assert tracking.server_answers()  # the server-down test during training asks with the token too

    # The whole set-up a stage does (a fresh process: setup points MLflow at the store for good).
    code = "from charrnn import tracking_store; print(tracking_store.setup('preflight'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import mlflow

    experiment = mlflow.MlflowClient(f"http://127.0.0.1:{auth_front.upstream_port}").get_experiment_by_name("preflight")
    assert experiment is not None and experiment.experiment_id == done.stdout.split()[-1]

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "wrong-token")
    with pytest.raises(UserError) as err:
        tracking.check_server()
    assert one_line(err) == (f"MLflow tracking server {uri} refused the token in MLFLOW_TRACKING_TOKEN "
                             "(401 Unauthorized); set MLFLOW_TRACKING_TOKEN to a token the server accepts")
    assert not tracking.server_answers()


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")  # urllib3, on MLFLOW_TRACKING_INSECURE_TLS
def test_an_https_server_with_a_certificate_of_its_own(tls_front, monkeypatch):
    front, cert, other = tls_front
    uri = front.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError) as err:  # not trusted by the system's CAs
        tracking.check_server()
    message = one_line(err)
    assert message.startswith(f"MLflow tracking server {uri}: its TLS certificate is not trusted ("), message
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in message and "MLFLOW_TRACKING_INSECURE_TLS=true" in message
    assert not tracking.server_answers()

    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(other))  # another CA: still refused, named
    with pytest.raises(UserError) as err:
        tracking.check_server()
    assert one_line(err).startswith(f"MLflow tracking server {uri}: its TLS certificate does not verify against "
                                    f"MLFLOW_TRACKING_SERVER_CERT_PATH={other} ("), str(err.value)

    forwarded = front.forwarded
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    tracking.check_server()
    assert tracking.server_answers()
    assert front.forwarded >= forwarded + 2  # both questions reached the server

    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    forwarded = front.forwarded
    tracking.check_server()
    assert front.forwarded > forwarded


STAGE_PREFLIGHT = """
import importlib.util, sys
from charrnn.errors import exit_on_user_error
spec = importlib.util.spec_from_file_location("train_stage", "stages/train.py")
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
try:
    exit_on_user_error(stage.check_server)()
finally:
    print("tensorflow loaded:", "tensorflow" in sys.modules)
"""


def test_wrong_basic_credentials_stop_the_train_stage_in_one_line_before_tensorflow_loads(auth_front, monkeypatch):
    uri = auth_front.uri
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD="wrong")
    # The train stage's own imports and its preflight, in a fresh process.
    done = subprocess.run([sys.executable, "-c", STAGE_PREFLIGHT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines == [f"error: MLflow tracking server {uri} refused user '{USER}' with this password "
                     f"(401 Unauthorized); {tracking.AUTH_FIX}"]
    assert done.stdout.strip() == "tensorflow loaded: False"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    with pytest.raises(UserError) as err:  # MLflow sends a user only with a password: nothing is sent
        tracking.check_server()
    assert one_line(err) == (f"MLflow tracking server {uri} refused a client without credentials "
                             f"(MLFLOW_TRACKING_USERNAME is '{USER}' but MLFLOW_TRACKING_PASSWORD is unset) "
                             f"(401 Unauthorized); {tracking.AUTH_FIX}")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracking.check_server()  # the right password passes


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status in the server's ``status``, the body in its ``body``."""

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, body, expected", [
    # A gateway's own 401 in JSON: MlflowClient's exception would call it INTERNAL_ERROR.
    (401, b'{"message": "Unauthorized"}', "refused a client without credentials (401 Unauthorized); set "
                                          "MLFLOW_TRACKING_USERNAME"),
    (403, b"Permission denied", "denied a client without credentials access (403 Forbidden)"),
    (502, b"<html>Bad Gateway</html>", "is unreachable (502 Bad Gateway from the proxy in front of it)"),
    (500, b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}',
     "answers with an error (500 Internal Server Error: INTERNAL_ERROR database is locked); see the server's log"),
    (404, b"<html>Not Found</html>", "answers but is not an MLflow tracking server (POST "
                                     "/api/2.0/mlflow/experiments/search: HTTP 404)"),
    (200, b"<html>a web site</html>", "answers but is not an MLflow tracking server"),
], ids=["401-json", "403", "502", "500-mlflow", "404", "200-html"])
def test_each_answer_of_a_server_is_named_in_one_line(status, body, expected):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.status, server.body = status, body
    with serving(server):
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(UserError) as err:
            tracking._check_server_answers(uri)
        assert uri in one_line(err) and expected in str(err.value), str(err.value)


def test_a_server_that_accepts_but_never_answers_is_unreachable_after_the_timeout():
    with socket.socket() as listener:  # the kernel completes the connection; nothing ever reads it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UserError) as err:
            tracking._check_server_answers(uri, timeout=1)
        assert time.monotonic() - started < 30  # one try, no back-off
        assert one_line(err).startswith(f"MLflow tracking server {uri} is unreachable (no answer in 1 s); start it")
        assert not tracking.server_answers(uri, timeout=1)
