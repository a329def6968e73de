"""The checkpoint: what resumes it (the resume key) and what it restores (dropout's random state)."""

from __future__ import annotations


import numpy as np

from charrnn.model import build_model
from conftest import defaults


def test_a_checkpoint_resumes_under_another_strategy_but_not_other_params():
    from dataclasses import replace

    from charrnn.checkpoints import resume_key

    manifest = {"seq_length": 100, "splits": {}}
    base = defaults("train", lr_decay_fraction=0.0)  # epochs are part of the key under a decay (below)
    key = resume_key(base, manifest)
    assert resume_key(replace(base, strategy="multi_worker"), manifest) == key
    assert resume_key(replace(base, epochs=base.epochs + 5), manifest) == key
    assert resume_key(replace(base, log_every_steps=1), manifest) == key
    assert resume_key(replace(base, learning_rate=0.002), manifest) != key
    assert resume_key(base, {**manifest, "seq_length": 50}) != key
    # A decaying learning rate is laid out over all the epochs: more epochs, another schedule.
    decaying = replace(base, lr_decay_fraction=0.2)
    assert resume_key(replace(decaying, epochs=base.epochs + 5), manifest) != resume_key(decaying, manifest)


def test_a_checkpoint_resumes_dropout_where_it_stood(tmp_path):
    """Keras does not save a Dropout layer's random state with the model; without the checkpoint's
    copy of it a resumed run drops other units than the uninterrupted one (measured: different
    weights after one more epoch)."""
    import keras
    import tensorflow as tf

    from charrnn import lstm_cpu
    from charrnn.checkpoints import Checkpoints
    from charrnn.optimizer import compile_model

    ids = np.random.default_rng(0).integers(0, 11, (24, 10)).astype("int32")
    data = lambda: tf.data.Dataset.from_tensor_slices((ids, ids)).batch(4)  # noqa: E731
    keras.utils.set_random_seed(42)
    model = build_model(11, embedding_dim=4, rnn_units=8, num_layers=1, dropout=0.5, cell="lstm")
    lstm_cpu.install_model(model)
    compile_model(model, 1e-2)
    model.fit(data(), epochs=1, verbose=0)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.save(model, {"key": "k", "epoch": 1, "history": [{}], "run_id": None})
    model.fit(data(), epochs=2, initial_epoch=1, verbose=0)

    keras.utils.set_random_seed(42)  # as the train stage does before it loads
    state, resumed = checkpoints.load("k", 2)
    assert state["seed_states"]["dropout_0"][1] == 6  # six batches drawn before the checkpoint
    lstm_cpu.install_model(resumed)
    resumed.fit(data(), epochs=2, initial_epoch=1, verbose=0)
    for expected, got in zip(model.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(got, expected)
