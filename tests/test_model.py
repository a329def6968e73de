"""The model: cuDNN-compatible LSTM arguments, weight decay."""

from __future__ import annotations


import numpy as np
import pytest

from charrnn.model import build_model


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_arguments_stay_cudnn_compatible(num_layers):
    """On a GPU Keras runs the fused cuDNN kernel only for these argument values."""
    from charrnn.model import rnn_layers

    for layer in rnn_layers(build_model(65, embedding_dim=8, rnn_units=16, num_layers=num_layers, dropout=0.1, cell="lstm")):
        config = layer.get_config()
        assert config["activation"] == "tanh" and config["recurrent_activation"] == "sigmoid"
        assert config["recurrent_dropout"] == 0 and config["unroll"] is False and config["use_bias"] is True
        assert layer.use_cudnn == "auto"


def test_weight_decay_shrinks_every_weight_apart_from_the_adam_step(tmp_path):
    """train.weight_decay > 0: one AdamW step lands ``learning_rate * weight_decay * w`` below the
    Adam step from the same weights on the same batch (decoupled decay), and the optimizer saves
    and reloads with its decay."""
    import keras
    import tensorflow as tf

    from charrnn import lstm_cpu
    from charrnn.model import compile_model, load_keras, save_keras

    ids = np.random.default_rng(0).integers(0, 11, (4, 10)).astype("int32")
    batch = tf.data.Dataset.from_tensor_slices((ids, ids)).batch(4)
    lr, decay = 1e-2, 0.5
    stepped = {}
    for wd in (0.0, decay):
        keras.utils.set_random_seed(3)
        model = build_model(11, embedding_dim=4, rnn_units=16, num_layers=1, dropout=0.0, cell="lstm")
        lstm_cpu.install_model(model)
        compile_model(model, lr, weight_decay=wd)
        before = [w.copy() for w in model.get_weights()]
        model.fit(batch, epochs=1, verbose=0)
        stepped[wd] = model.get_weights()
    assert type(model.optimizer).__name__ == "AdamW"
    for w0, adam, adamw in zip(before, stepped[0.0], stepped[decay]):
        np.testing.assert_allclose(adamw - adam, -lr * decay * w0, rtol=1e-3, atol=1e-7)
    save_keras(model, tmp_path / "model.keras")
    reloaded = load_keras(tmp_path / "model.keras")
    assert type(reloaded.optimizer).__name__ == "AdamW"
    assert reloaded.optimizer.weight_decay == decay
