"""Atomic writes: an output either exists complete or not at all.

Every artifact is written to a temporary name in the same folder and renamed into place, so an
interrupted stage never leaves a half-written file that the next stage (or DVC) would trust.
Temporary names start with ``.`` and carry ``.tmp`` (``.NAME.tmp.XXXX.SUFFIX`` for a file,
``.NAME.XXXX.tmp`` for a folder): a SIGKILL can leave one behind, and the next run of the stage
removes it (``remove_leftovers``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _naming(path: Path):
    """A full disk while writing ``path`` names it: the output the user knows (the outermost atomic
    write), not a temporary file inside it or a library's nameless error."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (Keras) insist on it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _naming(path):
            yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def temp_dir_beside(path: str | os.PathLike):
    """A scratch folder beside ``path`` with a temporary name, removed when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.tmp.", dir=path.parent) as scratch:
        yield Path(scratch)


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Temporary files and folders of ``path``'s atomic writes left beside it by a killed process."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return [entry for entry in path.parent.iterdir()
            if entry.name.startswith((f".{path.stem}.tmp.", f".{path.name}.tmp."))
            or (entry.name.startswith(f".{path.name}.") and entry.name.endswith(".tmp"))]


def remove_leftovers(*outputs: str | os.PathLike) -> None:
    """Remove what a killed earlier run left while writing ``outputs`` (a stage's own outputs only:
    never a shared folder another process may be writing into)."""
    for output in outputs:
        for entry in leftovers(output):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _naming(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_files(paths, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 (hex) of the files' contents read one after another, in ``paths``' order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path) -> str:
    """The SHA-256 (hex) of one file, as ``sha256sum`` prints it."""
    return sha256_files([path])
