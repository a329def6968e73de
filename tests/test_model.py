"""The model: cuDNN-compatible LSTM arguments, weight decay, the learning rate's cool-down."""

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


@pytest.mark.parametrize("decay_on", ["all", "kernels"])
def test_weight_decay_shrinks_the_weights_it_is_on_apart_from_the_adam_step(tmp_path, decay_on):
    """train.weight_decay > 0: one AdamW step lands ``learning_rate * weight_decay * w`` below the
    Adam step from the same weights on the same batch (decoupled decay): every weight with
    ``weight_decay_on: all``, the kernels only (not the biases, not the embeddings) with ``kernels``.
    The optimizer saves and reloads with its decay."""
    import keras
    import tensorflow as tf

    from charrnn import lstm_cpu
    from charrnn.model import load_keras, save_keras
    from charrnn.optimizer import compile_model

    ids = np.random.default_rng(0).integers(0, 11, (4, 10)).astype("int32")
    batch = tf.data.Dataset.from_tensor_slices((ids, ids)).batch(4)
    lr, decay = 1e-2, 0.5
    stepped = {}
    for wd in (0.0, decay):
        keras.utils.set_random_seed(3)
        model = build_model(11, embedding_dim=4, rnn_units=16, num_layers=1, dropout=0.0, cell="lstm")
        lstm_cpu.install_model(model)
        compile_model(model, lr, weight_decay=wd, weight_decay_on=decay_on)
        before = [w.copy() for w in model.get_weights()]
        model.fit(batch, epochs=1, verbose=0)
        stepped[wd] = model.get_weights()
    assert type(model.optimizer).__name__ == "AdamW"
    names = [v.path.split("/")[-1] for v in model.weights]
    assert names == ["embeddings", "kernel", "recurrent_kernel", "bias", "kernel", "bias"]
    for name, w0, adam, adamw in zip(names, before, stepped[0.0], stepped[decay]):
        decayed = decay_on == "all" or name.endswith("kernel")
        np.testing.assert_allclose(adamw - adam, -lr * decay * w0 if decayed else 0 * w0, rtol=1e-3, atol=1e-7,
                                   err_msg=name)
    save_keras(model, tmp_path / "model.keras")
    reloaded = load_keras(tmp_path / "model.keras")
    assert type(reloaded.optimizer).__name__ == "AdamW"
    assert reloaded.optimizer.weight_decay == decay
    assert getattr(reloaded.optimizer, "weight_decay_on", "all") == decay_on
    assert [reloaded.optimizer._use_weight_decay(v) for v in reloaded.trainable_variables] == [
        decay_on == "all" or n.endswith("kernel") for n in names]


@pytest.mark.parametrize("shape", ["cosine", "linear", "sqrt"])
def test_the_cool_down_holds_the_peak_then_falls_in_its_shape_to_its_floor(shape):
    """train.lr_decay_fraction, lr_decay_shape, lr_decay_to: the peak for the first 60 of 100 steps,
    then down to peak x lr_decay_to along the shape; the schedule survives Keras' serialization
    (a checkpoint's optimizer keeps it)."""
    import math

    import keras

    from charrnn.optimizer import learning_rate_schedule

    peak, floor = 0.01, 0.05
    schedule = learning_rate_schedule(peak, 100, 0.4, shape, floor)
    rates = [float(schedule(step)) for step in range(101)]
    assert rates[:61] == pytest.approx([peak] * 61)
    assert all(later < earlier for earlier, later in zip(rates[60:], rates[61:]))
    remaining = {"cosine": 0.5, "linear": 0.5, "sqrt": 1 - math.sqrt(0.5)}[shape]  # half-way through the fall
    assert rates[80] == pytest.approx(peak * (floor + (1 - floor) * remaining), rel=1e-6)
    assert rates[70] == pytest.approx(peak * (floor + (1 - floor) * {
        "cosine": 0.5 * (1 + math.cos(math.pi / 4)), "linear": 0.75, "sqrt": 0.5}[shape]), rel=1e-6)
    assert rates[100] == pytest.approx(peak * floor)
    copy = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert [float(copy(step)) for step in range(101)] == rates
    assert learning_rate_schedule(peak, 100, 0.0, shape, floor) == peak  # no decay: a constant
