"""params.yaml validated into typed sections: missing keys, numbers as people write them."""

from __future__ import annotations


import pytest

from charrnn.errors import UserError
from conftest import REPO, defaults


def test_a_key_missing_from_params_yaml_is_refused_naming_it():
    """params.yaml is the one source of defaults: no second value fills a gap."""
    from charrnn.config import SECTIONS, parse_section, read_params_file

    raw = read_params_file(REPO / "params.yaml")
    assert set(raw) == set(SECTIONS)
    for section, values in raw.items():
        parse_section(section, values)  # complete as shipped
        for key in values:
            with pytest.raises(UserError, match=rf"^params.yaml: missing key '{section}.{key}'; .*git show"):
                parse_section(section, {k: v for k, v in values.items() if k != key})
    with pytest.raises(UserError, match="missing section 'train'"):
        parse_section("train", None)


@pytest.mark.parametrize("written, value", [("3e-3", 0.003), ("1E-3", 0.001), (".5", 0.5), ("2", 2.0), (3e-3, 0.003)])
def test_numbers_are_accepted_as_people_write_them(written, value):
    """PyYAML (YAML 1.1) reads `3e-3` as a string; params.yaml accepts it as the number it spells."""
    from charrnn.config import parse_section

    parsed = parse_section("train", {**vars(defaults("train")), "learning_rate": written})
    assert parsed.learning_rate == value and isinstance(parsed.learning_rate, float)


def test_integers_written_as_numbers_and_non_finite_values():
    import yaml

    from charrnn.config import parse_section

    raw = yaml.safe_load("steps_per_epoch: 1e3\nbatch_size: 64\nlearning_rate: 3e-3\n")
    assert raw["learning_rate"] == "3e-3"  # the trap itself
    parsed = parse_section("train", {**vars(defaults("train")), **raw})
    assert (parsed.steps_per_epoch, parsed.batch_size, parsed.learning_rate) == (1000, 64, 0.003)
    for bad in (".inf", "-.inf", ".nan"):
        with pytest.raises(UserError, match="must be a finite number"):
            parse_section("train", {**vars(defaults("train")), **yaml.safe_load(f"learning_rate: {bad}")})
    with pytest.raises(UserError, match="must be an integer, got 2.5"):
        parse_section("train", {**vars(defaults("train")), "batch_size": 2.5})
    assert parse_section("sample", {**vars(defaults("sample")), "prime": "3e-3"}).prime == "3e-3"  # a string where a string is expected
