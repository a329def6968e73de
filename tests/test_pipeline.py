"""End to end: real `dvc repro` in a temporary git repository, the MLflow record, and the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
import zipfile

import mlflow
import pytest
import yaml

from conftest import BIN, copy_project, dvc, run

pytestmark = pytest.mark.slow


EVALUATE_ARGV = [str(BIN / "python"), "stages/evaluate.py", "--model", "models/char_rnn", "--sequences",
                 "data/sequences", "--metrics", "metrics/evaluate.json", "--samples", "samples/samples.txt"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def set_param(project, section, key, value):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def training_runs(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("tests")
    assert experiment is not None
    return mlflow.search_runs([experiment.experiment_id], output_format="list",
                              order_by=["attributes.start_time ASC"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_registered_model(project, run_):
    """One registered version per training, tagged; it turns a prime into text through pyfunc, the
    CLI and `mlflow models serve`, with the same generator as the model folder."""
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name = 'charrnn'")
    assert version.run_id == run_.info.run_id
    assert float(version.tags["val_loss"]) == pytest.approx(run_.data.metrics["val_loss"], abs=1e-6)
    assert float(version.tags["eval_val_loss"]) == pytest.approx(run_.data.metrics["eval_val_loss"], abs=1e-6)
    uri = f"models:/charrnn/{version.version}"
    texts = mlflow.pyfunc.load_model(uri).predict(["ROMEO: ", "MORE: "], params={"length": 40, "seed": 3})
    assert texts[0].startswith("ROMEO: ") and texts[1].startswith("MORE: ") and [len(t) for t in texts] == [47, 46]

    cli = [str(BIN / "charrnn"), "generate", "--length", "40", "--seed", "3", "--model"]
    from_folder = run(cli + ["models/char_rnn"], project).stdout
    assert from_folder == texts[0] + "\n"  # the same compiled generator, the same seed
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    scratch = project.parent / "generate-tmp"
    scratch.mkdir()
    # The champion alias (the only version here) through the CLI, as the README shows it.
    assert version.version == client.get_model_version_by_alias("charrnn", "champion").version
    assert run(cli + ["models:/charrnn@champion"], project, env={**env, "TMPDIR": str(scratch)}).stdout == from_folder
    assert not list(scratch.iterdir())  # the downloaded copy of the model is gone
    missing = run(cli + ["models:/charrnn/99"], project, env=env, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: cannot fetch models:/charrnn/99")

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port)], cwd=project, env={**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow models serve did not start"
                time.sleep(1)
        body = json.dumps({"inputs": ["ROMEO: "], "params": {"length": 40, "seed": 3}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.load(response)["predictions"] == [texts[0]]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_pipeline_end_to_end(trained_project, tmp_path):
    first = trained_project.repro  # `dvc repro` of a new project: every stage ran
    assert stages_run(first.stdout) == ["vectorize", "sequences", "train", "evaluate"]
    project = copy_project(trained_project, tmp_path / "project")
    for path in ("data/vectorized/vocabulary.json", "data/sequences/manifest.json", "models/char_rnn/model.keras",
                 "models/char_rnn/vocabulary.json", "models/char_rnn/model_summary.txt", "metrics/history.csv",
                 "metrics/evaluate.json", "samples/samples.txt"):
        assert (project / path).is_file(), path
    idle = [p.name for p in (project / "checkpoints/train").iterdir()]  # nothing to resume after a finished training
    assert idle == ["state.json"] and "model_file" not in yaml.safe_load((project / "checkpoints/train/state.json").read_text())
    history = (project / "metrics/history.csv").read_text().splitlines()
    assert history[0] == "epoch,chars,loss,val_loss" and len(history) == 3
    assert [int(row.split(",")[1]) for row in history[1:]] == [12 * 16 * 32, 24 * 16 * 32]  # steps x batch x length
    metrics = yaml.safe_load((project / "metrics/evaluate.json").read_text())
    assert metrics["eval_val_bpc"] == pytest.approx(metrics["eval_val_loss"] / 0.6931471805599453)
    assert metrics["eval_val_perplexity"] == pytest.approx(2.718281828459045 ** metrics["eval_val_loss"])
    assert 0 < metrics["eval_val_loss_carried"] != metrics["eval_val_loss"]  # the same windows, the state carried
    assert "ROMEO: " in (project / "samples/samples.txt").read_text()

    # Nothing changed: nothing runs.
    assert stages_run(dvc(project, "repro").stdout) == []
    assert "eval_val_loss" in dvc(project, "metrics", "show").stdout

    runs = training_runs(project)
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    rev = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert run_.info.run_name == rev[:7] and "dvc.exp_name" not in run_.data.tags  # plain `dvc repro`: the commit
    assert any(key.startswith("system/") for key in run_.data.metrics)  # system metrics (psutil)
    # One line says what runs (precision and why, the LSTM kernel), and the run records the same.
    (says,) = [line for line in first.stdout.splitlines() if line.startswith("train: precision ")]
    assert "float32 (set in params.yaml); LSTM: " in says
    assert says.split("; LSTM: ", 1)[1] == run_.data.tags["charrnn.lstm_kernel"] + " (set in params.yaml)"
    assert run_.data.tags["charrnn.lstm_kernel_path"] == run_.data.params["train.lstm_kernel_resolved"] == "sequence"
    assert json.loads((project / "metrics" / "train.json").read_text()) == {
        "precision": "float32", "lstm_kernel": run_.data.tags["charrnn.lstm_kernel"], "lstm_kernel_path": "sequence"}
    assert run_.data.tags["charrnn.precision"] == run_.data.params["train.precision_resolved"] == "float32"
    assert "charrnn.ops_build" in run_.data.tags
    corpus = json.loads((project / "data/vectorized/corpus.json").read_text())
    (dataset,) = mlflow.MlflowClient().get_run(run_.info.run_id).inputs.dataset_inputs
    assert corpus["sha256"].startswith(dataset.dataset.digest) and len(dataset.dataset.digest) >= 8
    assert run_.data.params["train.rnn_units"] == "32" and run_.data.params["data.val_fraction"] == "0.1"
    assert run_.data.metrics["eval_val_loss_carried"] == pytest.approx(metrics["eval_val_loss_carried"], abs=1e-9)
    assert {"train.input_dropout", "train.variational_dropout", "train.ema_momentum"} <= set(run_.data.params)
    assert "git.commit" in run_.data.tags and "charrnn.model_sha256" in run_.data.tags
    client = mlflow.MlflowClient()
    chars_per_step = 16 * 32  # TINY_PARAMS: batch 16 x seq_length 32
    val_steps = [m.step for m in client.get_metric_history(run_.info.run_id, "val_loss")]
    assert val_steps == [12 * chars_per_step, 24 * chars_per_step]  # every epoch end, in characters trained
    # train.log_every_steps (2 in TINY_PARAMS) steps apart, on the same axis
    every = yaml.safe_load((project / "params.yaml").read_text())["train"]["log_every_steps"]
    assert every == 2
    loss_steps = [m.step for m in client.get_metric_history(run_.info.run_id, "loss")]
    assert loss_steps == [s * chars_per_step for s in range(every, 25, every)]
    for name in ("learning_rate", "tokens_per_second"):
        assert [m.step for m in client.get_metric_history(run_.info.run_id, name)] == loss_steps
    eval_points = client.get_metric_history(run_.info.run_id, "eval_val_loss")
    assert [(m.step, m.value) for m in eval_points] == [(24 * chars_per_step, pytest.approx(metrics["eval_val_loss"]))]
    assert "val_bpc" not in run_.data.metrics  # evaluate's whole-split figures have names of their own
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"model_summary.txt", "vocabulary.json", "history.csv", "samples"} <= artifacts
    summary = client.download_artifacts(run_.info.run_id, "model_summary.txt")
    assert "Total params" in open(summary).read()
    # The model is logged once (no second Keras-flavour copy), without optimizer state.
    assert not any(a.path == "keras_model" for a in client.list_artifacts(run_.info.run_id))
    logged = mlflow.pyfunc.load_model(f"runs:/{run_.info.run_id}/model").unwrap_python_model().model
    assert logged.count_params() == int(run_.data.params["model.parameters"]) and getattr(logged, "optimizer", None) is None
    import h5py
    with zipfile.ZipFile(project / "models/char_rnn/model.keras") as archive, \
            h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        assert "optimizer" not in weights and "layers" in weights, list(weights)
    check_registered_model(project, run_)

    # An evaluate that fails is evaluate's own failure: tagged as such on the run, whose training
    # status stays FINISHED, the earlier metrics intact; the next successful evaluate (the sampling
    # change below) clears it.
    manifest = json.loads((project / "data/sequences/manifest.json").read_text())
    shard = project / "data/sequences" / manifest["splits"]["val"]["shards"][0]["file"]
    shard_bytes, metrics_bytes = shard.read_bytes(), (project / "metrics/evaluate.json").read_bytes()
    shard.write_bytes(shard_bytes[: len(shard_bytes) // 2])
    failed = run(EVALUATE_ARGV, project, check=False)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].startswith("error: "), failed.stderr
    tags = mlflow.get_run(run_.info.run_id).data.tags
    assert mlflow.get_run(run_.info.run_id).info.status == "FINISHED" and "charrnn.error" not in tags
    assert shard.name in tags["charrnn.evaluate_error"]
    assert (project / "metrics/evaluate.json").read_bytes() == metrics_bytes
    shard.write_bytes(shard_bytes)

    # A sampling change reruns only evaluate, into the same run, keeping the earlier samples.
    set_param(project, "sample", "temperature", 0.5)
    assert stages_run(dvc(project, "repro").stdout) == ["evaluate"]
    assert "charrnn.evaluate_error" not in mlflow.get_run(run_.info.run_id).data.tags
    runs = training_runs(project)
    assert len(runs) == 1
    samples = {a.path for a in client.list_artifacts(runs[0].info.run_id, "samples")}
    assert samples == {"samples/epoch_001.txt", "samples/epoch_002.txt",
                       "samples/t1_k0_n1_len80_seed7.txt", "samples/t0.5_k0_n1_len80_seed7.txt"}
    # The same model scored again: no second eval_val_loss point.
    assert len(client.get_metric_history(run_.info.run_id, "eval_val_loss")) == 1

    # A model change reruns train and evaluate only, as a second training run: here a narrower LSTM
    # with a learning rate that decays over the last half and an XLA-compiled train step.
    set_param(project, "train", "rnn_units", 16)
    set_param(project, "train", "lr_decay_fraction", 0.5)
    set_param(project, "train", "jit_compile", True)
    assert stages_run(dvc(project, "repro").stdout) == ["train", "evaluate"]
    runs = training_runs(project)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert runs[1].data.params["train.rnn_units"] == "16" and runs[1].data.params["train.lr_decay_fraction"] == "0.5"
    # Named by the commit and what differs from it (the params.yaml of HEAD)
    assert runs[1].info.run_name == f"{rev[:7]} jit_compile=True lr_decay_fraction=0.5 rnn_units=16"
    (version,) = client.search_model_versions(f"run_id = '{runs[1].info.run_id}'")
    assert version.tags["run_name"] == runs[1].info.run_name
    assert {a.path for a in client.list_artifacts(runs[1].info.run_id, "samples")}
    # The schedule, as DVC's plot data records the rate after every logged step (steps 2, 4, ..., 24):
    # held at the peak for the first half, then a cosine down to a tenth of it at the last step.
    peak = 0.01  # TINY_PARAMS learning_rate
    rows = list(csv.DictReader((project / "metrics/steps.csv").open()))
    rates = {int(r["chars"]) // (16 * 32): float(r["learning_rate"]) for r in rows}
    assert sorted(rates) == list(range(2, 25, 2))
    assert all(rates[step] == pytest.approx(peak) for step in range(2, 13, 2))
    assert peak / 10 < rates[18] < peak and rates[24] == pytest.approx(peak / 10)
    # MLflow has the schedule as numbers (plottable in the compare view), not the repr of its config.
    params = runs[1].data.params
    assert float(params["optimizer_learning_rate"]) == pytest.approx(peak)
    assert float(params["optimizer_learning_rate_floor"]) == pytest.approx(peak / 10)
    assert float(params["optimizer_learning_rate_decay_fraction"]) == pytest.approx(0.5)
    assert not [k for k, v in params.items() if v.startswith("{")], params

    # The CLI generates from the model trained on the decaying schedule (same seed, same text and
    # a refused prime: check_registered_model above, tests/test_generate.py, test_bad_input.py).
    args = [str(BIN / "charrnn"), "generate", "--model", "models/char_rnn", "--prime", "ROMEO: ",
            "--length", "200", "--seed", "3"]
    generated = run(args, project)
    assert generated.stdout.startswith("ROMEO: ") and len(generated.stdout) >= 207
