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


def _field(rule=None):
    return field(metadata={"rule": rule} if rule else {})


# ---- sections: one per stage family --------------------------------------------------------
# No defaults here: params.yaml is the one place every default lives, so a key missing from it is
# refused (``missing key``) rather than silently replaced by a second, different value.


@dataclass(frozen=True)
class DataConfig:
    source: str
    sha256: str | None
    val_fraction: float = _field(FRACTION)


@dataclass(frozen=True)
class SequencesConfig:
    seq_length: int = _field(POSITIVE)
    shard_size_mb: float = _field(POSITIVE)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _field(POSITIVE)
    embedding_dim: int = _field(POSITIVE)
    rnn_units: int = _field(POSITIVE)
    num_layers: int = _field(POSITIVE)
    cell: str = _field(_choice("lstm", "gru"))
    dropout: float = _field(DROPOUT)
    input_dropout: float = _field(DROPOUT)
    variational_dropout: bool = _field()
    epochs: int = _field(POSITIVE)
    steps_per_epoch: int | None = _field(POSITIVE)
    validation_steps: int | None = _field(POSITIVE)
    learning_rate: float = _field(POSITIVE)
    lr_decay_fraction: float = _field(_rule(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    lr_decay_shape: str = _field(_choice("cosine", "linear", "sqrt"))
    lr_decay_to: float = _field(_rule(lambda v: 0 <= v < 1, "must be in [0, 1) (a share of learning_rate)"))
    adam_beta_2: float = _field(FRACTION)
    clipnorm: float | None = _field(POSITIVE)
    weight_decay: float = _field(NON_NEGATIVE)
    weight_decay_on: str = _field(_choice("all", "kernels"))
    weight_drop: float = _field(DROPOUT)
    ema_momentum: float | None = _field(_rule(lambda v: 0 < v < 1, "must be in (0, 1), or null for off"))
    ema_warmup: bool = _field()
    precision: str = _field(_choice("auto", "float32", "mixed_bfloat16", "mixed_float16"))
    lstm_kernel: str = _field(_choice("auto", "sequence", "cell", "tf"))
    strategy: str = _field(_choice("default", "mirrored", "multi_worker"))
    shuffle_buffer: int = _field(POSITIVE)
    deterministic: bool = _field()
    jit_compile: bool = _field()
    log_every_steps: int = _field(POSITIVE)
    seed: int = _field(POSITIVE)  # TF refuses to trace seeded shuffles under global seed 0

    def __post_init__(self):
        if self.weight_drop and self.cell != "lstm":
            raise UserError(f"params.yaml: 'train.weight_drop' drops the LSTM's recurrent weights; with cell "
                            f"'{self.cell}' set it to 0 (or cell: lstm)")


# The sampling options' rules, as (check, what the value must be): params.yaml's ``sample`` section
# and ``charrnn.sampling.SamplingOptions.check`` (generate's flags, the served model) both use them.
# top_k's upper bound is the vocabulary, known once a model is.
SAMPLING_RULES = {
    "length": (lambda v: v >= 1, "must be a positive integer"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "must be >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "must be between 0 (off) and the vocabulary size"),
    "num_samples": (lambda v: v >= 1, "must be a positive integer"),
    "seed": (lambda v: v >= 0, "must be a non-negative integer"),
}


def _sampling(name: str):
    return _field(_rule(*SAMPLING_RULES[name]))


@dataclass(frozen=True)
class SampleConfig:
    prime: str
    length: int = _sampling("length")
    temperature: float = _sampling("temperature")
    top_k: int = _sampling("top_k")
    num_samples: int = _sampling("num_samples")
    seed: int = _sampling("seed")


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str
    registered_model: str = _field(_rule(lambda v: bool(v.strip()), "must not be empty"))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "sequences": SequencesConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "mlflow": MlflowConfig,
}


# ---- validation --------------------------------------------------------------------------


RESTORE_HINT = "every key needs a value: add it back (the shipped values: git show HEAD:params.yaml)"

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
        raise UserError(f"params.yaml: missing section '{name}'; {RESTORE_HINT}")
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
    missing = [key for key in known if key not in raw]
    if missing:
        keys = ", ".join(f"'{name}.{key}'" for key in missing)
        raise UserError(f"params.yaml: missing key{'s' if len(missing) > 1 else ''} {keys}; {RESTORE_HINT}")
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


def replace(config, **changes):
    """``config`` with ``changes`` applied, validated by the same rules as params.yaml."""
    name = next(n for n, cls in SECTIONS.items() if isinstance(config, cls))
    return parse_section(name, {**dataclasses.asdict(config), **changes})
