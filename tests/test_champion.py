"""The ``champion`` alias under concurrent evaluates: three processes, each as on a machine of its own,
released together by a barrier, each crowning its own version against one `mlflow server` on
PostgreSQL, round after round; after every round the alias is on the version with the lowest
eval_val_loss of the split."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

from test_team import mlflow_server  # noqa: F401 - the fixture: a server on a fresh PostgreSQL database

SPLIT = "split-a"
# Per round: the registered model, the loss offsets of the three processes' versions (each round 1.0 lower
# than the one before; on `charrnn` the alias moves every round, the best coming from each process in turn,
# and a tie goes to the older version), and how the evaluates are steered:
# - "together": a new model, every evaluate's first alias set held until all are there. MLflow inserts a new
#   alias after looking it up, so of sets at once some are refused (a duplicate key) about half the time.
# - "free": released together, nothing more.
# - "steered": the best version's evaluate writes its score only once the others have read the scores, and
#   they set the alias only once it has set it, so each of them first writes an alias that is stale by then.
ROUNDS = [*((f"new-{n}", (0.0, 0.1, 0.2)[n % 3:] + (0.0, 0.1, 0.2)[:n % 3], "together") for n in range(6)),
          ("charrnn", (0.2, 0.1, 0.0), "free"), ("charrnn", (0.0, 0.1, 0.2), "steered"),
          ("charrnn", (0.1, 0.0, 0.2), "free"), ("charrnn", (0.1, 0.0, 0.0), "steered"),
          ("charrnn", (0.2, 0.0, 0.1), "free"), ("charrnn", (0.0, 0.2, 0.1), "steered")]

_barriers = None


def _start(uri: str, barriers, scratch: Path) -> None:
    """A process as on a machine of its own: its own cache folder (where a lock file binds only it)."""
    global _barriers
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(dir=scratch)
    from charrnn import registry  # noqa: F401 - imported before the release, so the race is the crowning

    _barriers = barriers


def _hold(method: str, before=None, after=None) -> tuple:
    """Patch ``MlflowClient.<method>`` in this process: its first call waits at ``before`` (a barrier) before
    the request and at ``after`` once it returns. Returns the patch and the list of the calls' arguments."""
    import mlflow

    original, calls = getattr(mlflow.MlflowClient, method), []

    def held(self, *args, **kwargs):
        calls.append(args)
        if before is not None and len(calls) == 1:
            before.wait()
        result = original(self, *args, **kwargs)
        if after is not None and len(calls) == 1:
            after.wait()
        return result

    return mock.patch.object(mlflow.MlflowClient, method, held), calls


def _evaluate(name: str, version: str, loss: float, role: str) -> tuple[str, list[str]]:
    """One evaluate, ``role`` one of "together", "free", and "best" or "other" in a steered round. Returns
    record_and_crown's line and the versions it set the alias to."""
    from charrnn import registry

    release, scores_read, crowned = _barriers
    holds = {"free": {},
             "together": {"set_registered_model_alias": (crowned, None)},
             "best": {"set_model_version_tag": (scores_read, None), "set_registered_model_alias": (None, crowned)},
             "other": {"search_model_versions": (None, scores_read), "set_registered_model_alias": (crowned, None)},
             }[role]
    patches = {method: _hold(method, *gates) for method, gates in holds.items()}
    patches.setdefault("set_registered_model_alias", _hold("set_registered_model_alias"))
    with contextlib.ExitStack() as stack:
        for patch, _ in patches.values():
            stack.enter_context(patch)
        release.wait()
        said = registry.record_and_crown(name, version, loss, SPLIT)
    return said, [args[2] for args in patches["set_registered_model_alias"][1]]


def test_concurrent_evaluates_leave_the_champion_on_the_lowest_loss(tmp_path, mlflow_server):  # noqa: F811
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    context = multiprocessing.get_context("spawn")
    barriers = [context.Barrier(3, timeout=60) for _ in range(3)]
    with ProcessPoolExecutor(3, mp_context=context, initializer=_start,
                             initargs=(mlflow_server.uri, barriers, tmp_path)) as pool:
        for number, (name, offsets, kind) in enumerate(ROUNDS, 1):
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name)
            versions = [client.create_model_version(name, f"runs:/{run_id}/model", run_id).version for _ in offsets]
            losses = [len(ROUNDS) - number + offset for offset in offsets]
            expected = versions[offsets.index(min(offsets))]  # the first of equals is the older
            roles = [("best" if v == expected else "other") if kind == "steered" else kind for v in versions]
            results = list(pool.map(_evaluate, [name] * 3, versions, losses, roles))
            said = "\n".join(line for line, _ in results)

            scored = client.search_model_versions(f"name = '{name}' AND tags.`val_split` = '{SPLIT}'")
            assert {v.version: float(v.tags["eval_val_loss"]) for v in scored if v.version in versions} == dict(
                zip(versions, losses))
            best = min(scored, key=lambda v: (float(v.tags["eval_val_loss"]), int(v.version)))
            assert best.version == expected
            champion = client.get_model_version_by_alias(name, "champion").version
            assert champion == expected, f"round {number} ({kind}): champion {champion}, best {expected}:\n{said}"
            assert all(line.startswith(f"champion: models:/{name}@champion ") for line, _ in results), said
            assert f"-> version {expected} " in said, said
            if kind == "steered":  # the steering worked: each other evaluate first set a version no longer best
                assert all(sets[0] != expected for (_, sets), role in zip(results, roles) if role == "other"), results
