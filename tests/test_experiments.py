"""DVC experiments as a user runs them: each carries its metrics and loss history, so `dvc exp show`,
`dvc metrics diff` and `dvc plots diff` compare them; queued experiments included."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import mlflow
import pytest

from conftest import copy_project, dvc, missing_prerequisite, run, wait_for_queue

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
    # A sweep queued with a -S list and a second -S (one worker: the store is an SQLite file; the team
    # test runs two workers on a server).
    dvc(project, "exp", "run", "--queue", "-S", "train.embedding_dim=4,12", "-S", "train.dropout=0.1")
    dvc(project, "queue", "start", "-j", "1")
    status = wait_for_queue(project)
    assert status.count("Success") == 2, status

    shown = shown_metrics(project)
    grid = sorted(name for name in shown if name not in ("main", "workspace"))
    assert len(grid) == 2, shown
    names = ("main", *grid)
    for name in names:
        assert isinstance(shown.get(name, {}).get("eval_val_loss"), float), f"{name}: {shown.get(name)}"
        assert isinstance(shown[name].get("eval_val_loss_carried"), float), f"{name}: {shown[name]}"
        # what trained it, beside its metrics: the precision and the LSTM kernel path
        assert shown[name]["precision"] == "float32" and shown[name]["lstm_kernel"], f"{name}: {shown[name]}"
    assert len({shown[n]["eval_val_loss"] for n in names}) == len(names)  # three different models
    swept = {name: (p["train.embedding_dim"], p["train.dropout"]) for name, p in grid_params(project).items()}
    assert sorted(swept.values()) == [(4, 0.1), (12, 0.1)] and set(swept) == set(grid), swept
    queued_a, queued_b = (next(n for n, v in swept.items() if v == wanted) for wanted in ((4, 0.1), (12, 0.1)))

    diff = json.loads(dvc(project, "metrics", "diff", queued_a, queued_b, "--json").stdout)
    loss = diff["metrics/evaluate.json"]["eval_val_loss"]
    assert loss["old"] == shown[queued_a]["eval_val_loss"] and loss["new"] == shown[queued_b]["eval_val_loss"]

    plots = json.loads(dvc(project, "plots", "diff", queued_b, queued_a, "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    (history,) = plots["data"]["loss history"]
    points = history["content"]["data"]["values"]
    assert {p["rev"] for p in points} == {queued_b, queued_a}
    # the training loss every logged step, the validation loss every epoch
    assert {p["filename::field"] for p in points} == {"steps.csv::loss", "history.csv::val_loss"}
    assert all(int(p["chars"]) > 0 for p in points)
    per_run = [p for p in points if p["rev"] == queued_a]
    assert sum(p["filename::field"] == "steps.csv::loss" for p in per_run) > sum(
        p["filename::field"] == "history.csv::val_loss" for p in per_run)

    assert "up to date" in dvc(project, "status").stdout  # the last experiment is in the workspace
    dvc(project, "exp", "apply", queued_a)
    assert json.loads((project / "metrics/evaluate.json").read_text())["eval_val_loss"] == shown[queued_a]["eval_val_loss"]
    assert "up to date" in dvc(project, "status").stdout

    # The runs, queued ones included, landed in the repository's own store, one per training.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("tests")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs}
    assert set(by_exp) == {None, *grid}
    assert all(by_exp[n].info.run_name == n for n in grid)  # named as in `dvc exp show`
    assert by_exp[queued_b].data.params["train.embedding_dim"] == "12"
    client = mlflow.MlflowClient()
    for name in grid:  # the registered version leads back to its experiment
        (version,) = client.search_model_versions(f"run_id = '{by_exp[name].info.run_id}'")
        assert version.tags["dvc.exp_name"] == name and version.tags["run_name"] == name
    assert "train.embedding_dim 8 → 12" in by_exp[queued_b].data.tags["mlflow.note.content"]

    # The champion alias names the best of the three, which leads back to its experiment and generates.
    best = min(names, key=lambda n: shown[n]["eval_val_loss"])
    champion = client.get_model_version_by_alias("charrnn", "champion")
    assert float(champion.tags["eval_val_loss"]) == pytest.approx(shown[best]["eval_val_loss"], abs=1e-6)
    assert champion.tags.get("dvc.exp_name", "main") == best  # `dvc repro`'s run has no experiment name
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")  # the CLI's models:/ path: tests/test_generate.py
    (text,) = mlflow.pyfunc.load_model("models:/charrnn@champion").predict(["the "], params={"length": 40, "seed": 3})
    assert text.startswith("the ") and len(text) == 44, text


def test_the_plots_page_renders_offline(trained_project, tmp_path):
    """`dvc plots show` writes a page with no remote script, and a browser without network draws the
    charts from it."""
    project = copy_project(trained_project, tmp_path / "project")
    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page) and "vegaEmbed" in page
    drawn = rendered_dom(tmp_path / "plots" / "index.html")
    marks = [tag for tag in re.findall(r"<(?:canvas|svg)[^>]*>", drawn) if 'class="marks"' in tag]
    assert marks and all(int(re.search(r'width="(\d+)', tag).group(1)) > 100 for tag in marks), drawn[-2000:]


def rendered_dom(page) -> str:
    """The page's DOM after its scripts ran in headless Chromium, every host unreachable."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        missing_prerequisite("no Chromium to render the plots page (.ci/run installs it with apt)")
    result = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                             "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def grid_params(project) -> dict[str, dict]:
    """``dvc exp show --json``'s train params per experiment (main is a branch, not listed here)."""
    out = {}
    for entry in json.loads(dvc(project, "exp", "show", "--json").stdout):
        for exp in entry.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name"):
                    train = rev["data"]["params"]["params.yaml"]["data"]["train"]
                    out[rev["name"]] = {f"train.{k}": v for k, v in train.items()}
    return out
