"""The `charrnn` command: the presets it prints, as `dvc exp run -S` reads them; generate's defaults."""

from __future__ import annotations

import pytest

from conftest import REPO


def test_the_tutorial_preset_is_the_tutorials_model_with_its_parameter_counts():
    """`dvc exp run $(charrnn preset tutorial)` over params.yaml: the seed model, 5,330,241 parameters."""
    import contextlib
    import io

    import yaml

    from charrnn.cli import PRESETS, main as cli
    from charrnn.config import parse_section, read_params_file
    from charrnn.model import model_from_config

    # What the CLI prints is what `dvc exp run -S` reads: YAML values, one -S per key.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli(["preset", "tutorial"])
    words = out.getvalue().split()
    assert words[::2] == ["-S"] * len(PRESETS["tutorial"])
    written = {k: yaml.safe_load(v) for k, v in (word.split("=", 1) for word in words[1::2])}
    assert written == PRESETS["tutorial"]

    raw = read_params_file(REPO / "params.yaml")
    for key, value in written.items():  # as `dvc exp run -S` writes them
        section, name = key.split(".")
        raw[section][name] = value
    train, seqs = parse_section("train", raw["train"]), parse_section("sequences", raw["sequences"])
    assert (train.batch_size, seqs.seq_length, train.learning_rate) == (64, 100, 1e-3)
    assert (train.dropout, train.clipnorm, train.weight_decay, train.lr_decay_fraction) == (0, None, 0, 0)
    assert (train.input_dropout, train.variational_dropout, train.ema_momentum) == (0, False, None)
    model = model_from_config(65, train, precision="float32")
    counts = {layer.name: layer.count_params() for layer in model.layers if layer.count_params()}
    assert counts == {"embedding": 16_640, "lstm": 5_246_976, "logits": 66_625}
    assert model.count_params() == 5_330_241


@pytest.mark.parametrize("name", ["tutorial", "small-corpus"])
def test_every_preset_sets_known_keys_to_valid_values(name):
    """What `charrnn preset NAME` prints, applied to params.yaml as `dvc exp run -S` would, validates."""
    import yaml

    from charrnn.cli import PRESETS, preset_arguments
    from charrnn.config import SECTIONS, parse_section, read_params_file

    raw = read_params_file(REPO / "params.yaml")
    arguments = preset_arguments(name)
    for word in arguments[1::2]:
        key, value = word.split("=", 1)
        section, field = key.split(".")
        assert field in raw[section], key  # `dvc exp run -S` refuses a key params.yaml lacks
        raw[section][field] = yaml.safe_load(value)
    for section in SECTIONS:
        parse_section(section, raw[section])
    assert len(arguments) == 2 * len(PRESETS[name])


def test_generate_takes_its_defaults_from_the_project_else_from_one_constant(tmp_path, monkeypatch, capsys):
    """In a project, `charrnn generate` defaults to dvc.yaml's model folder and params.yaml's sample
    section; elsewhere to charrnn.sampling's constants, with --model required (one line if missing)."""
    import shutil

    import yaml

    from charrnn.cli import GenerateDefaults, generate_defaults, main
    from charrnn.sampling import DEFAULT_PRIME, SamplingOptions
    from charrnn.serving import DEFAULTS
    from conftest import REPO

    assert generate_defaults(tmp_path) == GenerateDefaults(None, DEFAULT_PRIME, SamplingOptions())
    assert DEFAULTS == {k: getattr(SamplingOptions(), k) for k in ("length", "temperature", "top_k", "seed")}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"].update(prime="KING: ", length=33, seed=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    project = generate_defaults(tmp_path)
    assert project.model == yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["paths"]["model"]
    assert project.prime == "KING: " and project.options.length == 33 and project.options.seed == 5
    assert project.options.temperature == params["sample"]["temperature"]

    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(SystemExit) as exit_:
        main(["generate"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no --model given") and "--model" in line
