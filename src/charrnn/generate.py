"""Text generation with explicit LSTM state, compiled, at any batch size.

The tutorial calls the model once per character from Python and needs a stateful batch-1 copy of
the trained model. Here the state is an explicit tensor: the same trained weights generate K
streams at once with no rebuild, the prime is consumed and the characters are sampled inside one
compiled TensorFlow loop, and sampling is stateless (seeded by (seed, position)), so the same
seed gives the same text whatever ran before in the process and however the output is chunked.

The cell is the Keras LSTM's (or GRU's) own math (gates i, f, c, o; sigmoid/tanh) on the trained variables,
with one saving: the first layer's input projection ``embedding @ kernel + bias`` is precomputed
for the whole vocabulary, so a step costs one table lookup instead of a matmul.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from charrnn.errors import UserError
from charrnn.model import lstm_cell, rnn_layers
from charrnn.sampling import SamplingOptions
from charrnn.vocabulary import Vocabulary


class Generator:
    """Samples text from a trained char-rnn model (see module docstring)."""

    def __init__(self, model: keras.Model, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        layers = rnn_layers(model)
        self.cell_type = "gru" if isinstance(layers[0], keras.layers.GRU) else "lstm"
        self.units = [layer.cell.units for layer in layers]
        # Variables, not captured tensors: ``refresh`` loads new weights without retracing.
        self._w = {name: [tf.Variable(t, trainable=False) for t in tensors]
                   for name, tensors in self._weights(model).items()}
        # Explicit loops and conditions, no AutoGraph: converting this code took a second or two of
        # every process that generates (each training's per-epoch samples, evaluate, generate).
        self._prime_fn = tf.function(self._prime, reduce_retracing=True, autograph=False)
        self._sample_fn = tf.function(self._sample, reduce_retracing=True, autograph=False)

    def refresh(self, model: keras.Model) -> None:
        """Generate from ``model``'s current weights (the same architecture), e.g. after an epoch."""
        for name, tensors in self._weights(model).items():
            for variable, tensor in zip(self._w[name], tensors):
                variable.assign(tensor)

    def _weights(self, model: keras.Model) -> dict[str, list]:
        """The float32 tensors the step needs, by name."""
        cells = [layer.cell for layer in rnn_layers(model)]
        embedding = model.get_layer("embedding").embeddings
        dense = model.get_layer("logits")
        f32 = lambda v: tf.cast(tf.convert_to_tensor(v), tf.float32)  # noqa: E731
        # The GRU (reset_after) keeps two biases: [0] on the input projection, [1] on the recurrent one.
        gru = self.cell_type == "gru"
        input_bias = [f32(c.bias)[0] if gru else f32(c.bias) for c in cells]
        return {
            # (vocab, gates * units): the first layer's input projection for every symbol.
            "input_table": [f32(embedding) @ f32(cells[0].kernel) + input_bias[0]],
            "recurrent": [f32(c.recurrent_kernel) for c in cells],
            "recurrent_bias": [f32(c.bias)[1] for c in cells] if gru else [],
            "kernels": [f32(c.kernel) for c in cells[1:]],
            "biases": input_bias[1:],
            "dense": [f32(dense.kernel), f32(dense.bias)],
        }

    # ---- the compiled core ------------------------------------------------------------------

    def _step(self, ids, states):
        """One character for every stream: ids [K] -> logits [K, V], new states."""
        w = self._w
        z = tf.gather(w["input_table"][0], ids)
        new_states = []
        x = None
        for layer, state in enumerate(states):
            if layer > 0:
                z = x @ w["kernels"][layer - 1] + w["biases"][layer - 1]
            if self.cell_type == "gru":  # Keras' GRU, reset_after=True: gates z, r, candidate
                (h,) = state
                xz, xr, xh = tf.split(z, 3, axis=-1)
                rz, rr, rh = tf.split(h @ w["recurrent"][layer] + w["recurrent_bias"][layer], 3, axis=-1)
                update, reset = tf.sigmoid(xz + rz), tf.sigmoid(xr + rr)
                h = update * h + (1 - update) * tf.tanh(xh + reset * rh)
                new_states.append((h,))
            else:  # Keras' LSTM: gates i, f, candidate, o
                h, c = state
                h, c, _ = lstm_cell(z + h @ w["recurrent"][layer], c)
                new_states.append((h, c))
            x = h
        return x @ w["dense"][0] + w["dense"][1], new_states

    def _prime(self, prime_ids, states):
        """Consume the prime [K, P] in one call; return the logits after its last character."""
        logits = tf.zeros([tf.shape(prime_ids)[0], len(self.vocabulary)], tf.float32)

        def step(t, logits, states):
            logits, states = self._step(prime_ids[:, t], states)
            return t + 1, logits, states

        _, logits, states = tf.while_loop(lambda t, *_: t < tf.shape(prime_ids)[1], step, (0, logits, states))
        return logits, states

    def _sample(self, logits, states, length, temperature, top_k, seed, offset):
        """Sample ``length`` ids per stream; position p uses the stateless seed (seed, offset + p)."""

        def step(p, out, logits, states):
            ids = self._choose(logits, temperature, top_k, tf.stack([seed, offset + tf.cast(p, tf.int64)]))
            logits, states = self._step(ids, states)
            return p + 1, out.write(p, ids), logits, states

        _, out, logits, states = tf.while_loop(lambda p, *_: p < length, step,
                                               (0, tf.TensorArray(tf.int32, size=length), logits, states))
        return tf.transpose(out.stack()), logits, states

    @staticmethod
    def _choose(logits, temperature, top_k, seed):
        def kept_top_k():
            kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
            return tf.where(logits < kth, tf.constant(-np.inf, logits.dtype), logits)

        logits = tf.cond(top_k > 0, kept_top_k, lambda: logits)
        return tf.cond(
            tf.equal(temperature, 0.0),
            lambda: tf.argmax(logits, axis=-1, output_type=tf.int32),
            lambda: tf.cast(tf.random.stateless_categorical(logits / temperature, 1, seed=seed)[:, 0], tf.int32),
        )

    # ---- public API ------------------------------------------------------------------------

    def zero_state(self, batch: int):
        if self.cell_type == "gru":
            return [(tf.zeros([batch, u]),) for u in self.units]
        return [(tf.zeros([batch, u]), tf.zeros([batch, u])) for u in self.units]

    def stream(self, prime: str, options: SamplingOptions, chunk: int = 256):
        """Yield the generated text in chunks: lists of K strings (prime not included)."""
        options.check(len(self.vocabulary))
        if not prime:
            raise UserError("the prime is empty; give at least one character, e.g. --prime 'ROMEO: '")
        prime_ids = self.vocabulary.encode(prime)
        k = options.num_samples
        batch_prime = tf.constant(np.tile(prime_ids[None, :], (k, 1)), tf.int32)
        logits, states = self._prime_fn(batch_prime, self.zero_state(k))
        done = 0
        while done < options.length:
            n = min(chunk, options.length - done)
            ids, logits, states = self._sample_fn(
                logits, states, tf.constant(n), tf.constant(float(options.temperature)),
                tf.constant(options.top_k), tf.constant(options.seed, tf.int64), tf.constant(done, tf.int64),
            )
            done += n
            yield [self.vocabulary.decode(row) for row in ids.numpy()]

    def generate(self, prime: str, options: SamplingOptions) -> list[str]:
        """K texts, each starting with the prime."""
        texts = [prime] * options.num_samples
        for pieces in self.stream(prime, options):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts

    def next_char_probabilities(self, text: str) -> np.ndarray:
        """Teacher-forced next-character distributions [len(text), V] (to compare with the model)."""
        ids = tf.constant(self.vocabulary.encode(text)[None, :], tf.int32)
        states = self.zero_state(1)
        rows = []
        for t in range(ids.shape[1]):
            logits, states = self._step(ids[:, t], states)
            rows.append(tf.nn.softmax(logits)[0].numpy())
        return np.stack(rows)
