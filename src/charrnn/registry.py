"""The registered model's ``champion`` alias: the version with the lowest validation loss.

MLflow deprecated registry stages; an alias is how users and ``mlflow models serve`` address "the
model we ship" (``models:/charrnn@champion``). After every evaluate, the evaluated version is tagged
with its whole-split validation loss and a digest of the validation split it was scored on, and the
alias goes to the best version scored on that split: the lowest loss, among equal losses the oldest
version (so a new version must beat the champion; a tie keeps it). Losses on different corpora or
splits do not compare: when the champion was scored on another split, the alias goes to the best
version scored on this one.

Evaluates on several machines share one server, and MLflow has no compare-and-set on aliases, so
none takes a lock. Each writes its score first, then reads every scored version and the alias, sets
the alias if it is not on the best, and reads again until it is (a first set that the server refuses
because another evaluate created the alias that moment counts as a lost race: read again). The alias
ends on the best: the last evaluate to set it reads again after that set, so it sees every score
written before its read and finds its choice still best (else it would set again and not be the
last). A score written after that read comes from an evaluate whose own read is later still and
sees the alias as it stays: were that score better, that evaluate would set the alias, and it would
be the last. An evaluate that set the alias and then finds it on another split's version stops
there: an evaluate on another corpus finished alongside and, by the same argument, leaves the alias
on that split's best.
"""

from __future__ import annotations

from pathlib import Path

from charrnn import files

CHAMPION = "champion"
LOSS_TAG = "eval_val_loss"
SPLIT_TAG = "val_split"  # digest of the validation shards the loss was measured on


def split_digest(val_paths: list[Path]) -> str:
    """The validation split's identity: a digest of its shard files (corpus, split and windows)."""
    return files.sha256_files(val_paths)[:16]


def _loss(version) -> float | None:
    try:
        return float(version.tags[LOSS_TAG])
    except (KeyError, ValueError):
        return None


def _champion(client, name: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        return None


def record_and_crown(name: str, version: str, val_loss: float, split: str, attempts: int = 20) -> str:
    """Tag ``version`` of ``name`` with ``val_loss`` on ``split``; put ``champion`` on the best version
    of ``split``. Returns one line saying where the alias points and why."""
    import mlflow

    client = mlflow.MlflowClient()
    before = _champion(client, name)
    client.set_model_version_tag(name, version, LOSS_TAG, f"{val_loss:.6f}")
    client.set_model_version_tag(name, version, SPLIT_TAG, split)
    moved = False
    for _ in range(attempts):
        current = _champion(client, name)
        scored = [v for v in client.search_model_versions(f"name = '{name}' AND tags.`{SPLIT_TAG}` = '{split}'")
                  if _loss(v) is not None]
        best = min(scored, key=lambda v: (_loss(v), int(v.version)))
        if current is not None and current.version == best.version:
            break
        if moved and current is not None and current.tags.get(SPLIT_TAG) not in (None, split):
            return (f"champion: models:/{name}@{CHAMPION} -> version {current.version} (scored on another corpus or "
                    f"validation split by an evaluate alongside this one; version {version}: {val_loss:.4f})")
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
        except mlflow.exceptions.MlflowException:
            if current is not None or _champion(client, name) is None:
                raise
            continue  # two first sets at once: the server inserts the alias once and refuses the other
        moved = True
    else:
        raise RuntimeError(f"the {CHAMPION} alias of registered model {name!r} did not settle on the best version "
                           f"after {attempts} tries: other evaluates keep moving it")
    if before is not None and before.version == best.version:
        return (f"champion: models:/{name}@{CHAMPION} stays version {best.version} "
                f"(eval_val_loss {_loss(best):.4f}; version {version}: {val_loss:.4f})")
    if before is None:
        why = "the first version scored"
    elif before.tags.get(SPLIT_TAG) != split or _loss(before) is None:
        why = f"version {before.version} was scored on another corpus or validation split"
    else:
        verb = "beats" if _loss(best) < _loss(before) else "is older than"
        why = f"{verb} version {before.version}'s {_loss(before):.4f}"
    return f"champion: models:/{name}@{CHAMPION} -> version {best.version} (eval_val_loss {_loss(best):.4f}; {why})"
