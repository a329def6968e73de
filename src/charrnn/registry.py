"""The registered model's ``champion`` alias: the version with the lowest validation loss.

MLflow deprecated registry stages; an alias is how users and ``mlflow models serve`` address "the
model we ship" (``models:/charrnn@champion``). After every evaluate, the evaluated version is tagged
with its whole-split validation loss and a digest of the validation split it was scored on, and the
alias moves to it only when it beats the champion on the same split (a tie keeps the champion).
Losses on different corpora or splits do not compare: when the champion was scored on another
split, the alias goes to the best version scored on this one. Compare and set run under a file
lock, so two evaluates finishing at once (``dvc queue start -j 2``) cannot both win.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from charrnn import machine

CHAMPION = "champion"
LOSS_TAG = "eval_val_loss"
SPLIT_TAG = "val_split"  # digest of the validation shards the loss was measured on


def split_digest(val_paths: list[Path]) -> str:
    """The validation split's identity: a digest of its shard files (corpus, split and windows)."""
    digest = hashlib.sha256()
    for path in val_paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _loss(version) -> float | None:
    try:
        return float(version.tags[LOSS_TAG])
    except (KeyError, ValueError):
        return None


def record_and_crown(name: str, version: str, val_loss: float, split: str) -> str:
    """Tag ``version`` of ``name`` with ``val_loss`` on ``split``; move ``champion`` if it wins.
    Returns one line saying where the alias points and why."""
    import mlflow

    client = mlflow.MlflowClient()
    with machine.locked(machine.cache_dir() / "champion.lock"):  # one machine's queue workers
        client.set_model_version_tag(name, version, LOSS_TAG, f"{val_loss:.6f}")
        client.set_model_version_tag(name, version, SPLIT_TAG, split)
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except mlflow.exceptions.MlflowException:  # no champion yet
            current = None
        same_split = [v for v in client.search_model_versions(f"name = '{name}'")
                      if v.tags.get(SPLIT_TAG) == split and _loss(v) is not None]
        # Lowest loss; among equals the oldest version keeps it.
        best = min(same_split, key=lambda v: (_loss(v), int(v.version)))
        if current is not None and current.tags.get(SPLIT_TAG) == split and _loss(current) is not None \
                and _loss(current) <= _loss(best):
            return (f"champion: models:/{name}@{CHAMPION} stays version {current.version} "
                    f"(eval_val_loss {_loss(current):.4f}; version {version}: {val_loss:.4f})")
        client.set_registered_model_alias(name, CHAMPION, best.version)
        if current is None:
            why = "the first version scored"
        elif current.tags.get(SPLIT_TAG) != split:
            why = f"version {current.version} was scored on another corpus or validation split"
        else:
            why = f"beats version {current.version}'s {_loss(current):.4f}"
    return f"champion: models:/{name}@{CHAMPION} -> version {best.version} (eval_val_loss {_loss(best):.4f}; {why})"
