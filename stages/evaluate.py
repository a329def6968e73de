"""DVC stage `evaluate`: val loss (nats and bits per char) and samples, logged to the model's run."""

import argparse
from pathlib import Path

from charrnn.config import load_params
from charrnn.errors import exit_on_user_error
from charrnn.prologue import before_tensorflow, loading_tensorflow
from charrnn.tracking_store import check_server


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
    before_tensorflow(args.metrics, args.samples, checks=[check_server])
    with loading_tensorflow():
        from charrnn.evaluate import evaluate

    evaluate(args.model, args.sequences, sample, mlflow_config.experiment, args.metrics, args.samples)


if __name__ == "__main__":
    main()
