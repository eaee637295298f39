"""The stored vectors of a split: features/<id>/<split>/shard-*.parquet, read in store order.

A VectorSet names one split of a features directory. What its shards say about themselves (their
list, the problem ids, the vector layout, the checksums' fingerprint) is read once, on first use,
and kept; the vectors themselves are streamed on every pass, 16,384 rows at a time (fewer above
8,192 dimensions: at most 512 MiB of float32), so no float32 copy of a whole pool is ever held
unless a caller asks for one (load).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from gradsel.core.errors import GradselError
from gradsel.store.directory import shard_marker

READ_ROWS = 16384
READ_BYTES = 512 << 20  # a 7B model's ~200 modules x 256 would make 16,384 rows 3.3 GB of float32


@dataclass(frozen=True)
class VectorSet:
    """The vectors of one split ("train" or "val") of a features directory. Its ids, layout and
    fingerprint are read from the shards once: make a new VectorSet to see a rescore (a selection
    makes its own)."""

    directory: Path
    split: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))

    @cached_property
    def shards(self) -> list[Path]:
        shards = sorted((self.directory / self.split).glob("shard-*.parquet"))
        if not shards:
            raise GradselError(
                f"{self.directory} holds no {self.split} vectors (the exact feature stores none)",
                "score with --feature projected or head for vector-based modes",
            )
        return shards

    @cached_property
    def ids_arrow(self):
        """The problem ids in store order, as one pyarrow ChunkedArray."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        return pa.chunked_array(
            [
                chunk
                for s in self.shards
                for chunk in pq.read_table(s, columns=["problem_id"]).column("problem_id").chunks
            ],
            type=pa.string(),
        )

    @cached_property
    def ids(self) -> list[str]:
        """The problem ids in store order."""
        return self.ids_arrow.to_pylist()

    @cached_property
    def layout(self) -> tuple[int, str]:
        """(dim, stored dtype), from the first shard's schema (no data is read)."""
        import pyarrow.parquet as pq

        from gradsel.core.schema import vector_layout

        return vector_layout(pq.read_schema(self.shards[0]).field("vector"))

    @property
    def dim(self) -> int:
        return self.layout[0]

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the shards' recorded checksums: it changes whenever any shard does."""
        h = hashlib.sha256()
        for shard in self.shards:
            marker = shard_marker(shard)
            h.update(shard.name.encode())
            h.update(marker.read_bytes() if marker.is_file() else str(shard.stat().st_mtime_ns).encode())
        return h.hexdigest()

    def batches(self, reuse: bool = False) -> Iterator[np.ndarray]:
        """The unit vectors in store order, as float32 (rows, dim): READ_ROWS at a time, or fewer
        for vectors so wide that those would pass READ_BYTES. Memory stays a few hundred MB whatever
        the pool's size. `reuse`: every batch is written into one buffer, valid until the next one
        (for a consumer that keeps nothing): no page faults on fresh memory for every batch."""
        import warnings

        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from gradsel.core.schema import stored_vectors, vector_layout

        buffer = None
        for shard in self.shards:
            f = pq.ParquetFile(shard, memory_map=True)
            field = f.schema_arrow.field("vector")
            rows = max(1, min(READ_ROWS, READ_BYTES // (4 * vector_layout(field)[0])))
            for batch in f.iter_batches(batch_size=rows, columns=["vector"]):
                stored = stored_vectors(batch.column(0), field)
                if buffer is None or not reuse or buffer.shape[0] < len(stored):
                    buffer = np.empty(stored.shape, dtype=np.float32)
                out = buffer[: len(stored)]
                with warnings.catch_warnings():  # a read-only view of the file's bytes: torch only reads it
                    warnings.simplefilter("ignore", UserWarning)
                    source = torch.from_numpy(np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("=")))
                # torch converts float16 with the CPU's F16C instructions, on every thread (docs/benchmarks.md).
                torch.from_numpy(out).copy_(source)
                yield out
            del f
            pa.default_memory_pool().release_unused()  # Arrow's allocator would keep every freed page

    def load(self) -> np.ndarray:
        """The float32 unit vectors of the whole split: for the validation set and small pools."""
        return np.concatenate(list(self.batches()))

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32 vectors at the given store positions, in that order (one pass over the shards)."""
        positions = np.asarray(positions, dtype=np.int64)
        out, start = None, 0
        for chunk in self.batches():
            if out is None:
                out = np.zeros((len(positions), chunk.shape[1]), dtype=np.float32)
            inside = (positions >= start) & (positions < start + len(chunk))
            out[inside] = chunk[positions[inside] - start]
            start += len(chunk)
        return out

    def best_inner_products(self, queries: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted positions, each one's largest inner product with any query row), in one streaming
        pass over the shards: nothing the size of the pool is allocated."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        best = np.empty(len(positions), dtype=np.float64)
        start = 0
        for chunk in self.batches():
            lo, hi = np.searchsorted(positions, [start, start + len(chunk)])
            if hi > lo:
                best[lo:hi] = (chunk[positions[lo:hi] - start] @ queries.T).max(axis=1)
            start += len(chunk)
        return positions, best
