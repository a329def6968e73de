"""DVC stage `train`: TFRecord shards -> trained model folder, loss history; one MLflow run."""

import argparse
import json
from pathlib import Path

from charrnn.artifacts import training_inputs
from charrnn.config import as_flat_dict, load_params
from charrnn.errors import UserError, exit_on_user_error
from charrnn.prologue import before_tensorflow, loading_tensorflow
from charrnn.threads import configure_cpu_replicas, cpu_replicas_from_env
from charrnn.tracking_store import check_server, setup


@exit_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=Path, required=True, help="output of `sequences`")
    parser.add_argument("--vocabulary", type=Path, required=True, help="vocabulary.json of `vectorize`")
    parser.add_argument("--model", type=Path, required=True, help="model folder to write")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable training state")
    parser.add_argument("--history", type=Path, required=True, help="per-epoch losses (CSV)")
    parser.add_argument("--steps", type=Path, help="training loss every log_every_steps steps (CSV)")
    parser.add_argument("--run-info", type=Path, required=True,
                        help="what trained (JSON: precision, LSTM kernel path), a DVC metric")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus.json of `vectorize` (MLflow dataset)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    data, seqs, config, mlflow_config = load_params(args.params, "data", "sequences", "train", "mlflow")
    params = {**as_flat_dict("data", data), **as_flat_dict("sequences", seqs),
              **as_flat_dict("train", config), **as_flat_dict("mlflow", mlflow_config)}
    if not args.corpus.is_file():
        raise UserError(f"{args.corpus} not found (written by `vectorize` since this version); "
                        "rerun `dvc repro vectorize`")
    corpus = json.loads(args.corpus.read_text(encoding="utf-8"))
    checks = [lambda: training_inputs(args.sequences, args.vocabulary, config.batch_size), check_server,
              cpu_replicas_from_env]
    if config.strategy != "multi_worker":  # this process is the chief: the store and its experiment too
        checks.append(lambda: setup(mlflow_config.experiment))
    # the checkpoint folder sweeps its own leftovers
    before_tensorflow(args.model, args.history, args.run_info, args.steps, checks=checks)
    with loading_tensorflow(configure_cpu_replicas):
        from charrnn.train import TrainPaths, train
    paths = TrainPaths(sequences=args.sequences, vocabulary=args.vocabulary, model=args.model,
                       checkpoints=args.checkpoints, history=args.history, run_info=args.run_info, steps=args.steps)
    final = train(config, paths, mlflow_config.experiment, params, args.params, corpus, mlflow_config.registered_model)
    if final is None:
        print("worker done (the chief writes the model and the MLflow run)")
        return
    print(f"final: loss {final['loss']:.4f}, val_loss {final['val_loss']:.4f} "
          f"({final['val_bpc']:.4f} bits/char) -> {args.model}")


if __name__ == "__main__":
    main()
