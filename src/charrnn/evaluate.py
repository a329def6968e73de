"""Stage 4: validation loss over the whole val split, and sample texts, logged to the model's run.

Two losses over the same val windows: ``eval_val_loss`` reads each window from a zero state (as the
model trains, and what runs are ranked by); ``eval_val_loss_carried`` reads them as contiguous
streams with the state carried, as char-rnn reports it (lower: every character has its whole past).

The MLflow run is found by the SHA-256 of the model file (tagged by ``train``), so running only
``evaluate`` again (say with a new temperature) adds its samples and metrics to the same run
without creating a second training run, and without any run id stored in a DVC output.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import mlflow
import numpy as np
import tensorflow as tf

from charrnn import artifacts, files, lstm_cpu, model as model_lib, optimizer, registry, sequences, tracking
from charrnn.config import SampleConfig
from charrnn.generate import Generator
from charrnn.sampling import SamplingOptions
from charrnn.batches import validation_dataset

CARRIED_STREAMS = 16
EVAL_BATCH = 64  # windows per batch of the whole-split loss: only the summation order depends on it


def validation_loss(model, sequences_dir: Path, verbose: int = 1) -> tuple[float, int]:
    """Mean cross-entropy in nats/char over every val window, and the number of chars scored."""
    manifest = artifacts.load_manifest(sequences_dir)
    seq_length = manifest["seq_length"]
    paths = artifacts.shard_paths(sequences_dir, manifest, "val")
    lstm_cpu.install_model(model)  # the fast CPU LSTM (equal to Keras' within float round-off)
    optimizer.compile_model(model, learning_rate=1e-3)  # the loss only; nothing is trained
    windows = manifest["splits"]["val"]["windows"]
    loss = model.evaluate(validation_dataset(paths, seq_length, EVAL_BATCH, windows), verbose=verbose)
    return float(loss), windows * seq_length


def carried_state_loss(model, sequences_dir: Path, streams: int = CARRIED_STREAMS) -> tuple[float, int]:
    """Mean cross-entropy in nats/char over the val split read as ``streams`` contiguous streams with
    the recurrent state carried from window to window (as char-rnn measures it): each character is
    predicted from all the text before it in its stream, not only from the start of its window.
    The same windows as ``validation_loss`` (the last ``windows mod streams`` left out; a val split of
    fewer windows than ``streams`` is read as one stream per window); returns the loss and the number
    of chars scored."""
    manifest = artifacts.load_manifest(sequences_dir)
    paths = artifacts.shard_paths(sequences_dir, manifest, "val")
    windows = np.concatenate([w.numpy() for w in sequences.windows_dataset(paths, manifest["seq_length"]).batch(4096)])
    streams = min(streams, len(windows))
    per_stream = len(windows) // streams
    # Stream s reads windows [s * per_stream, (s + 1) * per_stream) in order: consecutive windows
    # continue the text (charrnn.sequences: window k covers ids[kL : kL + L + 1]).
    rows = windows[: streams * per_stream].reshape(streams, per_stream, -1)
    twin = model_lib.stateful_copy(model, streams)

    @tf.function
    def summed_loss(x, y):
        logits = tf.cast(twin(x, training=False), tf.float32)
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    total = sum(float(summed_loss(tf.constant(rows[:, t, :-1], tf.int32), tf.constant(rows[:, t, 1:], tf.int32)))
                for t in range(per_stream))
    chars = rows.shape[0] * rows.shape[1] * (rows.shape[2] - 1)
    return total / chars, chars


def sample_name(sample: SampleConfig) -> str:
    return f"t{sample.temperature:g}_k{sample.top_k}_n{sample.num_samples}_len{sample.length}_seed{sample.seed}"


def format_samples(sample: SampleConfig, texts: list[str]) -> str:
    header = (f"# prime={sample.prime!r} temperature={sample.temperature:g} top_k={sample.top_k} "
              f"length={sample.length} seed={sample.seed}\n")
    return header + "".join(f"\n--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))


def evaluate(model_dir: Path, sequences_dir: Path, sample: SampleConfig, experiment: str,
             metrics_path: Path, samples_path: Path) -> dict:
    experiment_id = tracking.setup(experiment)
    model, vocabulary = model_lib.load_model_dir(model_dir)
    options = SamplingOptions(sample.length, sample.temperature, sample.top_k, sample.num_samples, sample.seed)
    options.check(len(vocabulary))
    vocabulary.encode(sample.prime)  # refuse an unknown prime before the long evaluation

    model_hash = files.sha256_file(Path(model_dir) / model_lib.MODEL_FILE)
    run = tracking.find_run(experiment_id, tracking.MODEL_HASH_TAG, model_hash)
    # Not `with start_run`: on an error it would mark the training run FAILED. Evaluate's failure is
    # its own (tag charrnn.evaluate_error, cleared by the next success); the training's status stays.
    mlflow.start_run(run_id=run.info.run_id if run else None, experiment_id=experiment_id)
    run_id = mlflow.active_run().info.run_id
    # The training's own status is kept (a run reopened for evaluate would otherwise end FINISHED or FAILED).
    status = run.info.status if run and run.info.status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
    if run is None:  # the store was reset: keep the record in a run of its own
        mlflow.set_tags({**tracking.source_tags(), tracking.MODEL_HASH_TAG: model_hash})
    try:
        val_loss, chars = validation_loss(model, sequences_dir)
        carried, _ = carried_state_loss(model, sequences_dir)
        metrics = {"eval_val_loss": val_loss, "eval_val_bpc": val_loss / math.log(2),
                   "eval_val_perplexity": math.exp(val_loss), "eval_val_loss_carried": carried}
        texts = Generator(model, vocabulary).generate(sample.prime, options)
        text = format_samples(sample, texts)
        files.write_json(metrics_path, metrics)
        files.write_text(samples_path, text)
        # At the step training ended (characters trained), once: a rerun (new sampling params)
        # scores the same model, so it adds no second point.
        step = max(tracking.logged_steps(run_id, "val_loss"), default=0)
        if step not in tracking.logged_steps(run_id, "eval_val_loss"):
            mlflow.log_metrics(metrics, step=step)
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
        split = registry.split_digest(artifacts.shard_paths(sequences_dir, artifacts.load_manifest(sequences_dir), "val"))
        champion = [registry.record_and_crown(v.name, v.version, val_loss, split) for v in versions]
        mlflow.log_text(text, f"samples/{sample_name(sample)}.txt")
        tracking.delete_tag(run_id, tracking.EVALUATE_ERROR_TAG)
    except BaseException as err:
        with contextlib.suppress(Exception):  # a server that is gone: the stage's own error line says so
            mlflow.set_tag(tracking.EVALUATE_ERROR_TAG, tracking.error_text(err))
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status if run else "FAILED")
        raise
    mlflow.end_run(status=status)
    print(f"eval_val_loss {val_loss:.4f} nats/char, {metrics['eval_val_bpc']:.4f} bits/char, "
          f"perplexity {metrics['eval_val_perplexity']:.2f} over {chars:,} chars; with the state carried "
          f"({CARRIED_STREAMS} streams) {carried:.4f} nats/char -> {metrics_path}")
    print(*champion, sep="\n")
    print(text)
    return metrics
