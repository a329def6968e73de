"""DVC experiments as a user runs them: each carries its metrics and loss history, so `dvc exp show`,
`dvc metrics diff` and `dvc plots diff` compare them; queued experiments included."""

from __future__ import annotations

import json

import mlflow
import pytest

from conftest import copy_project, dvc, run, wait_for_queue

pytestmark = pytest.mark.slow


def shown_metrics(project) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name (or "main"): evaluate.json's values or the error}."""
    out = {}
    for entry in json.loads(dvc(project, "exp", "show", "--json").stdout):
        rows = [(entry.get("name") or entry["rev"], entry["data"])]
        for exp in entry.get("experiments") or []:
            rows += [(rev.get("name") or rev["rev"], rev["data"]) for rev in exp["revs"]]
        for name, data in rows:
            metrics = data.get("metrics") or {}
            evaluate, run_info = metrics.get("metrics/evaluate.json", {}), metrics.get("metrics/train.json", {})
            out[name] = {**(evaluate.get("data") or {"error": evaluate.get("error")}), **(run_info.get("data") or {})}
    return out




def test_every_experiment_carries_its_metrics_and_curves(trained_project, tmp_path):
    project = copy_project(trained_project, tmp_path / "project")  # after `dvc repro`
    run(["git", "add", "dvc.lock", "metrics"], project)  # the README's baseline step
    run(["git", "commit", "-q", "-m", "baseline run"], project)
    dvc(project, "exp", "run", "-n", "narrow", "-S", "train.rnn_units=16")
    dvc(project, "exp", "run", "--queue", "-n", "queued-a", "-S", "train.embedding_dim=4")
    dvc(project, "exp", "run", "--queue", "-n", "queued-b", "-S", "train.embedding_dim=12")
    dvc(project, "queue", "start", "-j", "1")
    status = wait_for_queue(project)
    assert status.count("Success") == 2, status

    shown = shown_metrics(project)
    names = ("main", "narrow", "queued-a", "queued-b")
    for name in names:
        assert isinstance(shown.get(name, {}).get("eval_val_loss"), float), f"{name}: {shown.get(name)}"
        # what trained it, beside its metrics: the precision and the LSTM kernel path
        assert shown[name]["precision"] == "float32" and shown[name]["lstm_kernel"], f"{name}: {shown[name]}"
    assert len({shown[n]["eval_val_loss"] for n in names}) == len(names)  # four different models

    diff = json.loads(dvc(project, "metrics", "diff", "narrow", "queued-b", "--json").stdout)
    loss = diff["metrics/evaluate.json"]["eval_val_loss"]
    assert loss["old"] == shown["narrow"]["eval_val_loss"] and loss["new"] == shown["queued-b"]["eval_val_loss"]

    plots = json.loads(dvc(project, "plots", "diff", "narrow", "queued-a", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    (history,) = plots["data"]["loss history"]
    points = history["content"]["data"]["values"]
    assert {p["rev"] for p in points} == {"narrow", "queued-a"}
    assert {p["field"] for p in points} == {"loss", "val_loss"} and all(int(p["chars"]) > 0 for p in points)

    assert "up to date" in dvc(project, "status").stdout  # the last experiment is in the workspace
    dvc(project, "exp", "apply", "narrow")
    assert json.loads((project / "metrics/evaluate.json").read_text())["eval_val_loss"] == shown["narrow"]["eval_val_loss"]
    assert "up to date" in dvc(project, "status").stdout

    # The runs, queued ones included, landed in the repository's own store, one per training.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("tests")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs}
    assert set(by_exp) == {None, "narrow", "queued-a", "queued-b"}
    assert all(by_exp[n].info.run_name == n for n in ("narrow", "queued-a", "queued-b"))
    assert by_exp["queued-b"].data.params["train.embedding_dim"] == "12"
    for name in ("narrow", "queued-a"):  # the registered version leads back to its experiment
        (version,) = mlflow.MlflowClient().search_model_versions(f"run_id = '{by_exp[name].info.run_id}'")
        assert version.tags["dvc.exp_name"] == name and version.tags["run_name"] == name
    assert "train.embedding_dim 8 → 12" in by_exp["queued-b"].data.tags["mlflow.note.content"]
