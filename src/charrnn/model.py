"""The char-RNN model: Embedding -> LSTM (x num_layers) -> Dense logits, saved reproducibly.

The training model is stateless: every batch starts from zero state and the LSTM state is never
carried implicitly. Generation (``charrnn.generate``) carries the state explicitly instead, with
the same layers, so one trained model generates at any batch size without a stateful copy.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras

from charrnn import artifacts, files
from charrnn.artifacts import MODEL_FILE, SUMMARY_FILE
from charrnn.errors import UserError, first_line
from charrnn.vocabulary import VOCABULARY_FILE, Vocabulary

RNN_CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


# ---- building ------------------------------------------------------------------------------


def build_model(
    vocab_size: int,
    *,
    embedding_dim: int,
    rnn_units: int,
    num_layers: int,
    dropout: float,
    cell: str,
    input_dropout: float = 0.0,
    variational_dropout: bool = False,
    precision: str = "float32",
    stateful_batch: int | None = None,
) -> keras.Model:
    """The tutorial's architecture, generalised to ``num_layers`` LSTMs (or GRUs, ``cell="gru"``,
    as the tutorial's current version uses) with dropout between. The sizes are params.yaml's
    ``train`` keys (``model_from_config``); there are no defaults here but "off" for the optional
    regularisers.

    ``input_dropout`` drops units of the character embeddings before the first recurrent layer;
    ``variational_dropout`` draws every dropout mask once per sequence and keeps it at every step
    (Gal & Ghahramani's variational dropout, AWD-LSTM's "locked" dropout) instead of anew per
    character. Both are ``keras.layers.Dropout`` (a ``noise_shape`` of 1 along time), inert at
    inference: the generator and the compiled LSTM see the same layers either way.

    The recurrent layers keep Keras' cuDNN-compatible defaults (tanh/sigmoid, no recurrent
    dropout, no unroll, bias on; for the GRU ``reset_after=True``), so on a GPU they run the fused
    cuDNN kernel. ``stateful_batch`` builds the stateful twin (fixed batch, state carried from batch
    to batch, as char-rnn trains on contiguous streams); its weights are the same list as the
    stateless model's.
    """
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {sorted(RNN_CELLS)}, got {cell!r}")
    policy = keras.mixed_precision.DTypePolicy(precision)
    ids = keras.Input(batch_shape=(stateful_batch, None), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding", dtype=policy)(ids)

    def dropped(x, rate, name):
        noise_shape = (None, 1, x.shape[-1]) if variational_dropout else None
        return keras.layers.Dropout(rate, noise_shape=noise_shape, name=name, dtype=policy)(x) if rate > 0 else x

    x = dropped(x, input_dropout, "input_dropout")
    for i in range(num_layers):
        x = RNN_CELLS[cell](
            rnn_units,
            return_sequences=True,
            recurrent_initializer="glorot_uniform",
            stateful=stateful_batch is not None,
            name=f"{cell}_{i}" if num_layers > 1 else cell,
            dtype=policy,
        )(x)
        x = dropped(x, dropout, f"dropout_{i}")
    # Logits stay float32 under mixed precision so the softmax cross-entropy is computed stably.
    logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32")(x)
    return keras.Model(ids, logits, name="char_rnn")


def model_from_config(vocab_size: int, config, precision: str | None = None,
                      stateful_batch: int | None = None) -> keras.Model:
    """``build_model`` with the architecture of a ``TrainConfig`` (``precision`` overrides its own)."""
    return build_model(vocab_size, embedding_dim=config.embedding_dim, rnn_units=config.rnn_units,
                       num_layers=config.num_layers, dropout=config.dropout, cell=config.cell,
                       input_dropout=config.input_dropout, variational_dropout=config.variational_dropout,
                       precision=precision or config.precision, stateful_batch=stateful_batch)


def stateful_copy(model: keras.Model, batch_size: int) -> keras.Model:
    """``model``'s layers rebuilt stateful for a fixed ``batch_size`` (each call continues from the
    state the last one left, from zeros at first), with its weights. Built from the model's
    own config, so any trained model folder (LSTM or GRU, any depth) gets one without its params."""
    config = model.get_config()
    for layer in config["layers"]:
        layer.pop("build_config", None)  # shapes with the old batch; the functional call builds each layer
        if layer["class_name"] == "InputLayer":
            layer["config"]["batch_shape"] = [batch_size, *layer["config"]["batch_shape"][1:]]
        elif layer["class_name"] in ("LSTM", "GRU"):
            layer["config"]["stateful"] = True
    twin = type(model).from_config(config)
    twin.set_weights(model.get_weights())
    return twin


def lstm_cell(z, c):
    """Keras' LSTM cell with its default activations, one step, in Keras' gate order (i, f, c, o):
    ``z = x @ kernel + h @ recurrent_kernel + bias`` [..., 4u] and the cell state ``c`` [..., u] give
    ``(h, c_new, (i, f, g, o, tanh(c_new)))``. The one copy of the gate arithmetic in Python: the
    fused CPU LSTM's TensorFlow loop and the generator call it (Keras' layer and the compiled ops
    of lstm_cpu_ops.cc compute the same, and tests compare them)."""
    import tensorflow as tf

    i, f, g, o = tf.split(z, 4, axis=-1)
    i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = tf.tanh(c_new)
    return o * tanh_c, c_new, (i, f, g, o, tanh_c)


def rnn_layers(model: keras.Model) -> list:
    """The recurrent layers (LSTM or GRU), input to output."""
    return [layer for layer in model.layers if isinstance(layer, (keras.layers.LSTM, keras.layers.GRU))]


def summary_text(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=None)
    return "\n".join(lines) + "\n"


# ---- saving and loading -----------------------------------------------------------------------


def _without_shared_object_ids(node):
    """Drop the ``shared_object_id``s Keras writes into the config.

    They are Python ``id()``s (different in every process) and are only written for some objects
    (a freshly built model and a reloaded one differ). They let a loader reuse one object for
    several references; for initializers and dtype policies a copy each is equivalent.
    """
    if isinstance(node, dict):
        return {k: _without_shared_object_ids(v) for k, v in node.items() if k != "shared_object_id"}
    if isinstance(node, list):
        return [_without_shared_object_ids(v) for v in node]
    return node


def _normalise_keras_zip(src: Path, dst: Path) -> None:
    """Rewrite a ``.keras`` zip with fixed timestamps, no save date and no object ids.

    ``model.save`` stamps the wall-clock time and memory addresses into the archive, which would
    make every retrain a different DVC output even when the weights are bit-identical.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in sorted(zin.namelist()):
            data = zin.read(name)
            if name == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif name == "config.json":
                data = json.dumps(_without_shared_object_ids(json.loads(data)), sort_keys=True).encode()
            zout.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def save_keras(model: keras.Model, path: Path, include_optimizer: bool = True) -> None:
    """Save ``model`` to ``path`` atomically and byte-reproducibly; with its optimizer's state (what
    a checkpoint needs to resume) or, ``include_optimizer=False``, only what inference needs: the
    architecture and the weights, a third of the size with AdamW's two moments per weight."""
    path = Path(path)
    if not include_optimizer and getattr(model, "optimizer", None) is not None:
        # The same layers and names, not compiled (keras.models.clone_model would compile the copy).
        inference = type(model).from_config(model.get_config())
        inference.set_weights(model.get_weights())
        model = inference
    # Keras writes the file itself; the scratch folder is named as every temporary of the project
    # (files.TEMP_MARK), so a kill's leftover is recognised and swept.
    with files.temp_dir_beside(path) as scratch, files.atomic_path(path) as tmp:
        raw = Path(scratch) / MODEL_FILE
        model.save(raw)
        _normalise_keras_zip(raw, tmp)


def load_keras(path: Path, compile: bool = True) -> keras.Model:
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise UserError(f"{path} is not a Keras model: not a zip archive (damaged or replaced); retrain it with `dvc repro`")
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=True)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a loadable Keras model ({first_line(err)[:200]}); "
                        "retrain it with `dvc repro`") from None


def save_model_dir(model: keras.Model, vocabulary: Vocabulary, out_dir: Path) -> None:
    """The trained model as a folder: ``model.keras`` (no optimizer state), ``vocabulary.json``,
    ``model_summary.txt``. What evaluate, generate and the logged MLflow model load."""
    with files.atomic_dir(out_dir) as tmp:
        save_keras(model, tmp / MODEL_FILE, include_optimizer=False)
        vocabulary.save(tmp / VOCABULARY_FILE)
        (tmp / SUMMARY_FILE).write_text(summary_text(model), encoding="utf-8")


def load_model_dir(model_dir: Path, compile: bool = False) -> tuple[keras.Model, Vocabulary]:
    """Load a trained model folder and check that its vocabulary fits the model's output."""
    model_dir = Path(model_dir)
    vocabulary = artifacts.check_model_dir(model_dir)
    model = load_keras(model_dir / MODEL_FILE, compile=compile)
    try:
        output_size = model.get_layer("logits").units
        model.get_layer("embedding")
    except ValueError:
        raise UserError(f"{model_dir / MODEL_FILE} is not a char-rnn model (no embedding/logits layers)") from None
    artifacts.check_output_size(model_dir, output_size, vocabulary)
    return model, vocabulary
