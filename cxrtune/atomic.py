"""Files and folders written so that a crash, a kill or a concurrent reader never sees
half of one: everything is written beside its target, then renamed over it (a rename
within one file system is atomic)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umasked(mode: int) -> int:
    """``mode`` under the process's umask, as open() and mkdir() apply it."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


# mkstemp and mkdtemp make private (0600 / 0700) entries; what they become is shared
# results (reports, checkpoints on a cluster's shared folder), readable as any file is.
_PLAIN_FILE, _PLAIN_DIR = _umasked(0o666), _umasked(0o777)


@contextlib.contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path``, on
    an error it is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _PLAIN_FILE)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    with replacing_file(path) as tmp:
        tmp.write_text(text)
    return path


@contextlib.contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """An empty temporary folder beside ``path`` to fill; on success it takes ``path``'s
    place (the previous folder is kept until then), on an error it is removed. A crash
    between the two renames leaves the previous folder as ``.<name>.old-*`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, _PLAIN_DIR)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["replacing_file", "write_text", "replacing_dir"]
