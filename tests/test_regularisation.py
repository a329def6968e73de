"""The quality levers of params.yaml's train section: variational and input dropout, weight drop, the
weights' moving average (with its warm-up), the cool-down, and evaluate's carried-state loss. Each
trains, saves, reloads and generates."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from charrnn import lstm_cpu, seams
from charrnn.checkpoints import Checkpoints
from charrnn.generate import Generator
from charrnn.model import load_model_dir, model_from_config, save_model_dir
from charrnn.optimizer import compile_for_training, compile_model, finalize_ema
from charrnn.sampling import SamplingOptions
from charrnn.vocabulary import Vocabulary
from conftest import defaults

VOCABULARY = Vocabulary.from_counts(set("abcdefghij \n"))
IDS = np.random.default_rng(0).integers(0, len(VOCABULARY), (24, 12)).astype("int32")


def small(**changes):
    """params.yaml's model, small, with ``changes``; the fast CPU LSTM installed as the train stage does."""
    config = defaults("train", embedding_dim=8, rnn_units=16, precision="float32", **changes)
    model = model_from_config(len(VOCABULARY), config)
    lstm_cpu.install_model(model, weight_drop=config.weight_drop)
    return model, config


def batches():
    return tf.data.Dataset.from_tensor_slices((IDS[:, :-1], IDS[:, 1:])).batch(4)


@pytest.mark.parametrize("variational", [True, False])
def test_dropout_masks_are_drawn_once_per_sequence_when_variational(variational):
    keras.utils.set_random_seed(11)  # the masks below are the same on every run
    model, _ = small(input_dropout=0.5, dropout=0.5, variational_dropout=variational)
    for name, width in (("input_dropout", 8), ("dropout_0", 16)):
        dropped = model.get_layer(name)(tf.ones((6, 9, width)), training=True).numpy()
        kept = dropped != 0
        same_along_time = all(np.array_equal(kept[:, t], kept[:, 0]) for t in range(9))
        assert same_along_time == variational, name
        # One mask per sequence, not one for the whole batch: the rows' masks differ.
        assert len({row.tobytes() for row in kept[:, 0]}) > 1, name
        assert 0 < kept.mean() < 1  # some dropped, some kept
    # The dropout is its own layer: the LSTM keeps the compiled kernel, and inference is deterministic.
    assert "Keras' own" not in lstm_cpu.kernel_path(model, 4)
    x = IDS[:2, :-1]
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))


@pytest.mark.slow
def test_the_train_stage_validates_the_moving_average_it_saves(trained_project, tmp_path):
    """With ema_momentum, each epoch's val_loss scores the weights' moving average: the last epoch's
    equals the loss of the saved model (the average) on the same val batches, to float round-off."""
    from charrnn.evaluate import validation_loss
    from charrnn.model import load_model_dir
    from conftest import copy_project, dvc

    project = copy_project(trained_project, tmp_path / "ema", upto="sequences",
                           overrides={"train": {"ema_momentum": 0.9, "validation_steps": None}})
    dvc(project, "repro", "train")
    last = (project / "metrics/history.csv").read_text().splitlines()[-1].split(",")
    model, _ = load_model_dir(project / "models/char_rnn")
    saved_loss, _ = validation_loss(model, project / "data/sequences", verbose=0)
    assert float(last[3]) == pytest.approx(saved_loss, abs=2e-6)


def test_weight_drop_drops_the_recurrent_weights_once_per_call_in_training_only():
    """weight_drop: in training the LSTM computes what Keras' own LSTM computes with the recurrent
    kernel dropped (one mask for the whole batch, drawn from the cell's seed generator, kept weights
    scaled by 1 / (1 - rate)), on the compiled path; the dropped weights get no gradient; each call
    draws another mask; inference uses the whole kernel."""
    rate = 0.5
    keras.utils.set_random_seed(3)
    model, _ = small(weight_drop=rate)
    layer = model.get_layer("lstm")
    assert "compiled whole-sequence" in lstm_cpu.kernel_path(model, 4)
    x = tf.random.stateless_normal((4, 7, 8), seed=(1, 2))
    before = seams.seed_state(layer.cell)
    with tf.GradientTape() as tape:
        trained = layer(x, training=True)
        loss = tf.reduce_sum(trained * tf.random.stateless_normal(trained.shape, seed=(3, 4)))
    grad = tape.gradient(loss, layer.cell.recurrent_kernel).numpy()
    seams.set_seed_state(layer.cell, before)
    dropped = keras.random.dropout(layer.cell.recurrent_kernel, rate, seed=layer.cell.seed_generator).numpy()
    kernel, recurrent, bias = (w.numpy() for w in layer.cell.weights)
    kept = dropped != 0
    assert 0.4 < kept.mean() < 0.6  # seeded: the same draw every run
    np.testing.assert_allclose(dropped[kept], recurrent[kept] / (1 - rate), rtol=1e-6)

    def keras_lstm(recurrent_kernel):
        plain = keras.layers.LSTM(16, return_sequences=True)
        plain.build(x.shape)
        plain.set_weights([kernel, recurrent_kernel, bias])
        return plain(x).numpy()

    np.testing.assert_allclose(trained.numpy(), keras_lstm(dropped), rtol=1e-5, atol=1e-6)
    assert np.all(grad[~kept] == 0) and np.count_nonzero(grad[kept]) > 0.9 * kept.sum()
    assert not np.allclose(layer(x, training=True).numpy(), trained.numpy(), atol=1e-3)  # another mask
    np.testing.assert_allclose(layer(x, training=False).numpy(), keras_lstm(recurrent), rtol=1e-5, atol=1e-6)


LEVERS = {
    "moving average": dict(ema_momentum=0.8),
    "every lever": dict(ema_momentum=0.8, ema_warmup=True, weight_drop=0.3, weight_decay_on="kernels",
                        adam_beta_2=0.99, lr_decay_fraction=0.5, lr_decay_shape="sqrt", lr_decay_to=0.0,
                        input_dropout=0.1, variational_dropout=True),
}


@pytest.mark.parametrize("levers", list(LEVERS))
def test_the_moving_average_is_what_training_leaves_saves_and_resumes(tmp_path, levers):
    """ema_momentum: after fit the model holds the moving average of the weights after each step
    (momentum 0 at the first step; with ema_warmup, min(ema_momentum, (1 + t) / (10 + t)) at the
    t-th step after it), not the last weights; a run resumed from a mid-training checkpoint, or from
    the last one, ends with the same bytes, with every other lever on too; the saved model reloads
    and generates."""
    momentum = 0.8
    keras.utils.set_random_seed(5)
    model, config = small(learning_rate=1e-2, **LEVERS[levers])
    compile_for_training(model, config, total_steps=12)
    after_each_step = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: after_each_step.append([v.numpy().copy() for v in model.trainable_variables]),
        # as EpochCheckpoint: after each epoch, before fit puts the average into the model
        on_epoch_end=lambda epoch, logs: Checkpoints(tmp_path / f"epoch{epoch + 1}").save(
            model, {"key": "k", "epoch": epoch + 1, "history": [{}] * (epoch + 1), "run_id": None}))
    model.fit(batches(), epochs=2, verbose=0, callbacks=[record])
    assert len(after_each_step) == 12

    average = after_each_step[0]
    for t, weights in enumerate(after_each_step[1:]):
        m = min(momentum, (1 + t) / (10 + t)) if config.ema_warmup else momentum
        average = [m * a + (1 - m) * w for a, w in zip(average, weights)]
    for got, expected, last in zip(model.trainable_variables, average, after_each_step[-1]):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got.numpy(), last, atol=1e-4)  # not the last weights

    keras.utils.set_random_seed(5)  # as the train stage does before it loads
    _, resumed = Checkpoints(tmp_path / "epoch1").load("k", 2)
    lstm_cpu.install_model(resumed, weight_drop=config.weight_drop)
    resumed.fit(batches(), epochs=2, initial_epoch=1, verbose=0)
    for expected, got in zip(model.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(got, expected)
    # A run killed after its last epoch's checkpoint resumes without fit: finalize_ema does fit's part.
    _, finished = Checkpoints(tmp_path / "epoch2").load("k", 2)
    assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), finished.get_weights()))
    finalize_ema(finished)
    for expected, got in zip(model.get_weights(), finished.get_weights()):
        np.testing.assert_array_equal(got, expected)

    save_model_dir(model, VOCABULARY, tmp_path / "model")
    reloaded, vocabulary = load_model_dir(tmp_path / "model")
    for expected, got in zip(model.get_weights(), reloaded.get_weights()):
        np.testing.assert_array_equal(got, expected)
    text = Generator(reloaded, vocabulary).generate("abc", SamplingOptions(length=20, seed=1))[0]
    assert text.startswith("abc") and len(text) == 23


@pytest.mark.parametrize("cell,num_layers", [("lstm", 2), ("gru", 1)])
def test_the_carried_state_loss_reads_each_stream_as_one_sequence(tmp_path, cell, num_layers):
    """evaluate's ``eval_val_loss_carried`` equals the loss of the model run over each stream's whole
    text in one call (the state carried through), and differs from the windows' loss."""
    from charrnn.evaluate import carried_state_loss, validation_loss
    from charrnn.artifacts import load_manifest, shard_paths
    from charrnn.sequences import build_sequences, windows_dataset
    from charrnn.vectorize import vectorize

    words = ["abba ", "cab ", "bad\n", "jig ", "hedge "]
    text = "".join(np.random.default_rng(1).choice(words, 1500))
    (tmp_path / "corpus.txt").write_text(text)
    vectorize(defaults("data", source=str(tmp_path / "corpus.txt"), sha256=None), tmp_path / "vec", tmp_path / "cache")
    build_sequences(tmp_path / "vec", tmp_path / "seq", 10, 1.0)
    keras.utils.set_random_seed(2)
    model, config = small(cell=cell, num_layers=num_layers)
    compile_model(model, 3e-2)
    manifest = load_manifest(tmp_path / "seq")
    model.fit(windows_dataset(shard_paths(tmp_path / "seq", manifest, "train"), 10).batch(16)
              .map(lambda w: (w[:, :-1], w[:, 1:])), epochs=3, verbose=0)

    streams = 4
    carried, chars = carried_state_loss(model, tmp_path / "seq", streams=streams)
    windows = np.concatenate([w.numpy() for w in windows_dataset(shard_paths(tmp_path / "seq", manifest, "val"), 10).batch(999)])
    per_stream = len(windows) // streams
    rows = windows[: streams * per_stream].reshape(streams, per_stream, 11)
    whole = np.concatenate([rows[:, 0, :1], rows[:, :, 1:].reshape(streams, -1)], axis=1)  # each stream's text
    logits = model(whole[:, :-1], training=False)
    expected = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(whole[:, 1:], logits)))
    assert chars == streams * per_stream * 10
    assert carried == pytest.approx(expected, abs=2e-5)
    window_loss, _ = validation_loss(model, tmp_path / "seq", verbose=0)
    assert abs(window_loss - carried) > 1e-3  # what carrying the state changes, well above the tolerance
    # More streams than windows (a small corpus): one window per stream, nothing carried, nothing left out.
    one_each, chars_each = carried_state_loss(model, tmp_path / "seq", streams=10_000)
    assert chars_each == len(windows) * 10 and one_each == pytest.approx(window_loss, abs=2e-5)
