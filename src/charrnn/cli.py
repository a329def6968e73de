"""The ``charrnn`` command: ``charrnn generate --model DIR --prime TEXT ...``, and
``charrnn preset NAME``, which prints a named set of params as ``dvc exp run`` arguments."""

from __future__ import annotations

import argparse
import sys

from charrnn.errors import UserError, exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charrnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample text from a trained model")
    gen.add_argument("--model", default="models/char_rnn",
                     help="model folder written by the train stage, or an MLflow model: models:/charrnn/<version>, "
                          "runs:/<run id>/model")
    gen.add_argument("--prime", default="ROMEO: ", help="text the samples start with")
    gen.add_argument("--length", type=int, default=1000, help="characters to generate after the prime")
    gen.add_argument("--temperature", type=float, default=1.0,
                     help="> 0 scales the logits; 0 means greedy (always the most likely character)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely characters (0: all)")
    gen.add_argument("--num-samples", type=int, default=1, help="streams generated at once (one batch)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same text")
    preset = sub.add_parser("preset", help="print a named set of params as `dvc exp run -S` arguments, "
                                           "e.g. dvc exp run -n tutorial $(charrnn preset tutorial)")
    preset.add_argument("name", help="tutorial: TensorFlow's tutorial model (Embedding 256, LSTM 1024, 64 x 100)")
    return parser


def generate(args) -> None:
    from charrnn.sampling import SamplingOptions

    options = SamplingOptions(args.length, args.temperature, args.top_k, args.num_samples, args.seed)
    options.check()  # before TensorFlow and the model load

    from charrnn.quiet import importing_tensorflow, quiet_python_logs

    from charrnn.threads import configure_threads, threads_from_env

    quiet_python_logs()
    threads_from_env()
    with importing_tensorflow():
        from charrnn.generate import Generator
        from charrnn.model import load_model_dir
    configure_threads()

    if args.model.startswith(("models:/", "runs:/")):
        import mlflow

        from charrnn import tracking
        from charrnn.serving import downloaded_model_dir

        tracking.check_server()
        mlflow.set_tracking_uri(tracking.tracking_uri())
        with downloaded_model_dir(args.model) as model_dir:  # read into memory, then removed
            model, vocabulary = load_model_dir(model_dir)
    else:
        model, vocabulary = load_model_dir(args.model)
    options.check(len(vocabulary))
    vocabulary.encode(args.prime)
    generator = Generator(model, vocabulary)
    if options.num_samples == 1:  # print as it goes
        sys.stdout.write(args.prime)
        for (piece,) in generator.stream(args.prime, options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for i, text in enumerate(generator.generate(args.prime, options)):
        print(f"--- sample {i + 1} ---\n{text}")


@exit_on_user_error
def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        generate(args)
    elif args.command == "preset":
        from charrnn.config import preset_arguments

        print(" ".join(preset_arguments(args.name)))
    else:  # pragma: no cover - argparse enforces the choices
        raise UserError(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
