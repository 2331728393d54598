"""Atomic file writes, the one mechanism behind every file this project publishes (docs/CONTRACTS.md).

A file is made under a temporary name in its final directory, fsynced, and moved into place with os.replace
(an atomic rename on one filesystem): a reader, or a retry after a crash, sees the whole file or none.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A fresh temporary name in `path`'s directory, so os.replace is a rename on the same filesystem."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a directory (after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_replace(tmp: Path, path: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)


def place_atomic(path: str | Path, fill) -> None:
    """Make `path` by `fill(temp path)` under a temporary name beside it, then fsync and rename: a reader,
    or a retry after a crash, sees the whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        fill(tmp)
        fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    place_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | Path, data, indent: int = 2) -> None:
    """`data` as sorted, indented JSON with a final newline, atomically."""
    write_atomic(path, (json.dumps(data, indent=indent, sort_keys=True) + "\n").encode())
