"""The ``charrnn`` command: ``charrnn generate`` samples text from a trained model; ``charrnn preset
NAME`` prints a named set of params as ``dvc exp run`` arguments.

In a project (a folder with dvc.yaml and params.yaml) ``generate``'s defaults are the project's: the
model folder dvc.yaml's train stage writes, and params.yaml's ``sample`` section. Elsewhere they are
``charrnn.sampling``'s, and ``--model`` is required.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from charrnn.errors import UserError, exit_on_user_error
from charrnn.sampling import DEFAULT_PRIME, SamplingOptions

# ---- presets: named sets of overrides ---------------------------------------------------------
# Applied with DVC so that the experiment and its MLflow run record every value:
#   dvc exp run -n tutorial $(charrnn preset tutorial)

PRESETS: dict[str, dict[str, typing.Any]] = {
    # TensorFlow's "Text generation with an RNN": Embedding(vocab, 256) -> LSTM(1024) -> Dense(vocab),
    # batches of 64 x 100 characters, Adam at Keras' default rate, no dropout, clipping, decay or average.
    # With its 65-symbol vocabulary: 5,330,241 parameters. The schedule stays the params.yaml one.
    "tutorial": {
        "sequences.seq_length": 100,
        "train.batch_size": 64,
        "train.embedding_dim": 256,
        "train.rnn_units": 1024,
        "train.num_layers": 1,
        "train.cell": "lstm",
        "train.dropout": 0.0,
        "train.input_dropout": 0.0,
        "train.variational_dropout": False,
        "train.ema_momentum": None,
        "train.learning_rate": 0.001,
        "train.lr_decay_fraction": 0.0,
        "train.clipnorm": None,
        "train.weight_decay": 0.0,
        "train.weight_drop": 0.0,
        "train.adam_beta_2": 0.999,
    },
    # A corpus of about 1 MB (tiny Shakespeare): read a dozen times or more in a run, so it overfits
    # without regularisers; these won on it in 10 minutes (benchmarks/RESULTS.md, Time to quality).
    # 12 x 500 steps: about 10 minutes on 2 AVX-512 cores.
    "small-corpus": {
        "train.epochs": 12,
        "train.steps_per_epoch": 500,
        "train.dropout": 0.3,
        "train.weight_drop": 0.2,
        "train.weight_decay": 0.1,
        "train.ema_momentum": 0.999,
        "train.ema_warmup": True,
        "train.lr_decay_fraction": 0.4,
        "train.lr_decay_shape": "linear",
        "train.lr_decay_to": 0.0,
    },
}


def preset_arguments(name: str) -> list[str]:
    """The preset as ``dvc exp run`` arguments: ``["-S", "train.batch_size=64", ...]``."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
    out = []
    for key, value in PRESETS[name].items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        out += ["-S", f"{key}={text}"]
    return out


# ---- generate's defaults ----------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateDefaults:
    model: str | None  # None: --model is required
    prime: str
    options: SamplingOptions


def generate_defaults(folder: Path = Path(".")) -> GenerateDefaults:
    """The project's defaults where ``folder`` is a project (dvc.yaml's model path, params.yaml's
    ``sample`` section), else charrnn.sampling's."""
    params, pipeline = folder / "params.yaml", folder / "dvc.yaml"
    if not (params.is_file() and pipeline.is_file()):
        return GenerateDefaults(None, DEFAULT_PRIME, SamplingOptions())
    import yaml

    from charrnn.config import load_params

    sample = load_params(params, "sample")
    variables = (yaml.safe_load(pipeline.read_text(encoding="utf-8")) or {}).get("vars") or []
    paths = next((v["paths"] for v in variables if isinstance(v, dict) and isinstance(v.get("paths"), dict)), {})
    return GenerateDefaults(paths.get("model"), sample.prime, SamplingOptions.of(sample))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charrnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fallback = SamplingOptions()

    def default(key: str, value) -> str:
        return f"default: {key} in a project, else {value!r}"

    gen = sub.add_parser("generate", help="sample text from a trained model")
    gen.add_argument("--model", help="model folder written by the train stage, or an MLflow model: "
                                     "models:/charrnn/<version>, models:/charrnn@champion, runs:/<run id>/model "
                                     "(default: dvc.yaml's paths.model in a project)")
    gen.add_argument("--prime", help="text the samples start with (" + default("params.yaml's sample.prime",
                                                                                 DEFAULT_PRIME) + ")")
    gen.add_argument("--length", type=int, help="characters to generate after the prime ("
                     + default("sample.length", fallback.length) + ")")
    gen.add_argument("--temperature", type=float, help="> 0 scales the logits; 0 means greedy ("
                     + default("sample.temperature", fallback.temperature) + ")")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely characters, 0: all ("
                     + default("sample.top_k", fallback.top_k) + ")")
    gen.add_argument("--num-samples", type=int, help="streams generated at once, one batch ("
                     + default("sample.num_samples", fallback.num_samples) + ")")
    gen.add_argument("--seed", type=int, help="same seed, same text (" + default("sample.seed", fallback.seed) + ")")
    preset = sub.add_parser("preset", help="print a named set of params as `dvc exp run -S` arguments, "
                                           "e.g. dvc exp run -n tutorial $(charrnn preset tutorial)")
    preset.add_argument("name", help="tutorial: TensorFlow's tutorial model (Embedding 256, LSTM 1024, 64 x 100); "
                                     "small-corpus: regularisers for a corpus of about 1 MB, 10 minutes")
    return parser


def _model_folder(model_path: str):
    """The model folder itself, or a registered model or run's model (``models:/``, ``runs:/``)
    downloaded into a temporary folder that the block's end removes."""
    if not model_path.startswith(("models:/", "runs:/")):
        return contextlib.nullcontext(Path(model_path))
    import mlflow

    from charrnn import tracking_store as tracking
    from charrnn.quiet import quiet_python_logs
    from charrnn.serving import downloaded_model_dir

    quiet_python_logs()  # no download progress bars
    tracking.check_server()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    return downloaded_model_dir(model_path)


def generate(args) -> None:
    defaults = generate_defaults()
    model_path = args.model or defaults.model
    if model_path is None:
        raise UserError("no --model given and no dvc.yaml here to take the model folder from; "
                        "pass --model DIR or --model models:/charrnn@champion")
    prime = defaults.prime if args.prime is None else args.prime
    given = {name: getattr(args, name) for name in ("length", "temperature", "top_k", "num_samples", "seed")}
    options = replace(defaults.options, **{k: v for k, v in given.items() if v is not None})
    options.check()  # before TensorFlow and the model load
    with _model_folder(model_path) as model_dir:
        # The folder, the prime and the options checked, as far as they can be, before TensorFlow loads.
        from charrnn.artifacts import check_model_dir

        vocabulary = check_model_dir(model_dir)
        options.check(len(vocabulary))
        vocabulary.encode(prime)

        from charrnn.prologue import before_tensorflow, loading_tensorflow

        before_tensorflow()
        with loading_tensorflow():
            from charrnn.generate import Generator
            from charrnn.model import load_model_dir
        model, vocabulary = load_model_dir(model_dir)
    generator = Generator(model, vocabulary)
    if options.num_samples == 1:  # print as it goes
        sys.stdout.write(prime)
        for (piece,) in generator.stream(prime, options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for i, text in enumerate(generator.generate(prime, options)):
        print(f"--- sample {i + 1} ---\n{text}")


@exit_on_user_error
def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        generate(args)
    elif args.command == "preset":
        print(" ".join(preset_arguments(args.name)))
    else:  # pragma: no cover - argparse enforces the choices
        raise UserError(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
