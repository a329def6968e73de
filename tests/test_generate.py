"""The generator: reproducible, batched, and computing the same function as the trained model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from charrnn.errors import UserError
from charrnn.generate import Generator
from charrnn.sampling import SamplingOptions
from charrnn.model import build_model, load_model_dir, save_model_dir
from charrnn.vocabulary import Vocabulary

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.from_counts(set(TEXT))


def _model(vocabulary, num_layers=1, precision="float32", seed=3, cell="lstm", dropout=0.0):
    """``dropout`` > 0: every dropout layer params.yaml can add (input, between layers, variational)."""
    keras.utils.set_random_seed(seed)
    return build_model(len(vocabulary), embedding_dim=8, rnn_units=24, num_layers=num_layers, dropout=dropout,
                       input_dropout=dropout, variational_dropout=dropout > 0, precision=precision, cell=cell)


@pytest.fixture(scope="module")
def generator(vocabulary):
    return Generator(_model(vocabulary), vocabulary)


def test_same_seed_same_text_at_batch_1_and_k(generator):
    one = SamplingOptions(length=120, seed=11)
    many = SamplingOptions(length=120, seed=11, num_samples=5)
    first = generator.generate("ROMEO:", one)
    generator.generate("ROMEO:", SamplingOptions(length=50, seed=99, num_samples=3))  # other work in between
    assert generator.generate("ROMEO:", one) == first
    batch = generator.generate("ROMEO:", many)
    assert generator.generate("ROMEO:", many) == batch
    assert len(batch) == 5 and len(set(batch)) > 1  # independent streams
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 120 for t in first + batch)
    assert generator.generate("ROMEO:", SamplingOptions(length=120, seed=12)) != first


def test_output_does_not_depend_on_chunking(generator):
    options = SamplingOptions(length=100, seed=5, num_samples=2)
    whole = ["".join(p) for p in zip(*generator.stream("the", options, chunk=100))]
    chunked = ["".join(p) for p in zip(*generator.stream("the", options, chunk=7))]
    assert whole == chunked


def test_greedy_equals_top_k_1(generator):
    greedy = generator.generate("It is", SamplingOptions(length=60, temperature=0.0, num_samples=2))
    top1 = generator.generate("It is", SamplingOptions(length=60, temperature=1.0, top_k=1, seed=4, num_samples=2))
    assert greedy == top1


def test_prime_longer_than_the_training_sequence(generator):
    prime = TEXT * 4  # > 100 characters
    (text,) = generator.generate(prime, SamplingOptions(length=30, seed=1))
    assert text.startswith(prime) and len(text) == len(prime) + 30


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_generator_reproduces_teacher_forced_probabilities(vocabulary, num_layers, cell):
    model = _model(vocabulary, num_layers=num_layers, cell=cell, dropout=0.3 if num_layers == 2 else 0.0)
    ids = vocabulary.encode(TEXT)[None, :]
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(ids), axis=-1))[0]
    got = Generator(model, vocabulary).next_char_probabilities(TEXT)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (SamplingOptions(temperature=-1.0), "temperature"),
        (SamplingOptions(length=0), "length"),
        (SamplingOptions(top_k=-1), "top-k"),
        (SamplingOptions(top_k=10_000), "top-k"),
        (SamplingOptions(num_samples=0), "num-samples"),
    ],
)
def test_out_of_range_options_are_refused(generator, options, message):
    with pytest.raises(UserError, match=message):
        generator.generate("R", options)


def test_unknown_prime_characters_are_listed(generator):
    with pytest.raises(UserError, match="'Z'.*'~'|'~'.*'Z'"):
        generator.generate("Z~", SamplingOptions(length=5))


def test_bf16_policy_round_trips_and_generates(tmp_path, vocabulary):
    model = _model(vocabulary, precision="mixed_bfloat16")
    save_model_dir(model, vocabulary, tmp_path / "model")
    loaded, loaded_vocabulary = load_model_dir(tmp_path / "model")
    assert loaded.get_layer("lstm").dtype_policy.name == "mixed_bfloat16"
    assert loaded.get_layer("logits").dtype_policy.name == "float32"
    ids = vocabulary.encode(TEXT)[None, :]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(ids)), keras.ops.convert_to_numpy(loaded(ids)))
    (text,) = Generator(loaded, loaded_vocabulary).generate("ROMEO:", SamplingOptions(length=40, seed=2))
    assert text.startswith("ROMEO:") and len(text) == 46


def test_gru_model_round_trips_and_generates(tmp_path, vocabulary):
    model = _model(vocabulary, cell="gru")
    assert [type(layer).__name__ for layer in model.layers] == ["InputLayer", "Embedding", "GRU", "Dense"]
    save_model_dir(model, vocabulary, tmp_path / "model")
    loaded, loaded_vocabulary = load_model_dir(tmp_path / "model")
    generator = Generator(loaded, loaded_vocabulary)
    assert generator.cell_type == "gru"
    options = SamplingOptions(length=40, seed=2)
    assert generator.generate("ROMEO:", options) == Generator(model, vocabulary).generate("ROMEO:", options)


def test_mixed_float16_trains_with_loss_scaling_and_round_trips(tmp_path, vocabulary):
    """Keras wraps a LossScaleOptimizer only under a global mixed_float16 policy; ours is per layer."""
    from charrnn import lstm_cpu
    from charrnn.optimizer import compile_model

    model = _model(vocabulary, precision="mixed_float16")
    lstm_cpu.install_model(model)
    compile_model(model, 0.02, clipnorm=1.0)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    ids = vocabulary.encode(TEXT * 3)
    windows = np.stack([ids[i:i + 33] for i in range(0, len(ids) - 33, 8)])
    history = model.fit(windows[:, :-1], windows[:, 1:], batch_size=8, epochs=4, verbose=0).history["loss"]
    assert history[-1] < history[0] - 0.2  # it learns (float16 gradients did not underflow)
    assert float(model.optimizer.dynamic_scale) > 0
    from charrnn.model import load_keras, save_keras

    save_keras(model, tmp_path / "checkpoint.keras")  # as a checkpoint keeps it: with the optimizer
    assert isinstance(load_keras(tmp_path / "checkpoint.keras").optimizer, keras.optimizers.LossScaleOptimizer)
    save_model_dir(model, vocabulary, tmp_path / "model")  # for inference: without it
    loaded, loaded_vocabulary = load_model_dir(tmp_path / "model")
    assert loaded.get_layer("lstm").dtype_policy.name == "mixed_float16" and getattr(loaded, "optimizer", None) is None
    (text,) = Generator(loaded, loaded_vocabulary).generate("ROMEO:", SamplingOptions(length=40, seed=2))
    assert text.startswith("ROMEO:") and len(text) == 46


def test_refresh_loads_new_weights_without_a_new_generator(vocabulary):
    first, second = _model(vocabulary, seed=3), _model(vocabulary, seed=4)
    generator = Generator(first, vocabulary)
    before = generator.next_char_probabilities(TEXT)
    generator.refresh(second)
    after = generator.next_char_probabilities(TEXT)
    np.testing.assert_array_equal(after, Generator(second, vocabulary).next_char_probabilities(TEXT))
    assert np.abs(after - before).max() > 1e-4  # untrained: near-uniform, yet 2% apart
