"""DVC stage `evaluate`: val loss (nats and bits per char) and samples, logged to the model's run."""

import argparse
from pathlib import Path

from charrnn.config import load_params
from charrnn.files import remove_leftovers
from charrnn.errors import exit_on_user_error
from charrnn.quiet import importing_tensorflow, quiet_python_logs
from charrnn.threads import configure_threads, threads_from_env
from charrnn.tracking import check_server


@exit_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model folder of `train`")
    parser.add_argument("--sequences", type=Path, required=True, help="output of `sequences`")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--samples", type=Path, required=True, help="sample texts to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    sample, mlflow_config = load_params(args.params, "sample", "mlflow")
    remove_leftovers(args.metrics, args.samples)
    check_server()
    threads_from_env()  # a bad CHARRNN_THREADS fails before TensorFlow loads
    with importing_tensorflow():  # TensorFlow takes ~10 s to load: params and server first
        from charrnn.evaluate import evaluate
    quiet_python_logs()
    configure_threads()

    evaluate(args.model, args.sequences, sample, mlflow_config.experiment, args.metrics, args.samples)


if __name__ == "__main__":
    main()
