"""Atomic file writes: every file gradsel writes appears whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _publish(tmp: Path, path: Path) -> None:
    # fsync before rename so a crash cannot leave a renamed but empty file behind.
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_bytes(data)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_with(path: Path, write) -> None:
    """Call write(tmp_path) for a writer that takes a path (Parquet, FAISS), then publish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_table(path: Path, table) -> None:
    import pyarrow.parquet as pq

    from gradsel.core.schema import parquet_options

    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, **parquet_options(table.schema)))
