"""The champion alias's rules, one evaluate at a time (tests/test_champion.py races several)."""

from __future__ import annotations


def test_the_champion_alias_moves_only_to_a_better_version_on_the_same_split(tmp_path, monkeypatch):
    """Lower loss on the same validation split wins; a tie or a worse loss keeps the champion; a
    version scored on another split takes the alias only as the best of its own split."""
    import mlflow

    from charrnn import registry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    version = lambda: client.create_model_version("m", source=str(tmp_path)).version  # noqa: E731
    champion = lambda: client.get_model_version_by_alias("m", "champion").version  # noqa: E731
    v1, v2, v3, v4, v5 = (version() for _ in range(5))
    assert "-> version 1" in registry.record_and_crown("m", v1, 1.50, "A") and champion() == v1
    assert "-> version 2" in registry.record_and_crown("m", v2, 1.40, "A") and champion() == v2
    said = registry.record_and_crown("m", v3, 1.40, "A")  # a tie keeps the champion
    assert champion() == v2 and "stays version 2" in said and "version 3: 1.4000" in said
    assert "stays version 2" in registry.record_and_crown("m", v4, 1.45, "A")
    # Another corpus or split: not comparable, the best version of that split takes the alias.
    said = registry.record_and_crown("m", v5, 1.90, "B")
    assert champion() == v5 and "another corpus or validation split" in said
    # Re-scoring an old version on split A again moves it back to the best of A (version 2).
    registry.record_and_crown("m", v1, 1.50, "A")
    assert champion() == v2
    assert client.get_model_version("m", v2).tags == {"eval_val_loss": "1.400000", "val_split": "A"}
