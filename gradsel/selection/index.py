"""The stored vectors of a split, and the FAISS index built from them.

The Parquet shards are the record; the index is derived from them, never the other way round. It
is saved beside them (features/<id>/index/) with a marker that names the shards' checksums, and
rebuilt when they change. Vectors are read 16,384 rows at a time (fewer above 8,192 dimensions:
at most 512 MiB of float32), so no float32 copy of a whole pool is ever held unless the index
itself is flat.

Kinds (`gradsel select --index`):
  flat   exact inner products of unit vectors (cosine); float32, twice the float16 vectors
  ivf    k-means cells, exact inner products inside the nprobe cells nearest a query
  ivfpq  the same with product-quantized codes (dim / 16 bytes a vector): for pools whose vectors
         do not fit in memory; scores are approximate
  auto   flat up to AUTO_FLAT_MAX candidates, ivfpq above
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from gradsel.core import console
from gradsel.core.choices import INDEX_KINDS
from gradsel.core.errors import GradselError
from gradsel.store.stages import shard_marker

AUTO_FLAT_MAX = 200_000  # a flat index of 200k x 2048 float32 is 1.6 GB; above that, compress
INDEX_VERSION = 1


def faiss_module():
    try:
        import faiss
    except ImportError as exc:
        raise GradselError("FAISS is not installed",
                           "pip install 'gradsel[cpu]' (faiss-cpu) or 'gradsel[gpu]' (faiss-gpu)") from exc
    return faiss


# -- the stored vectors --------------------------------------------------------------------------

def vector_shards(directory: Path, split: str) -> list[Path]:
    shards = sorted((directory / split).glob("shard-*.parquet"))
    if not shards:
        raise GradselError(f"{directory} holds no {split} vectors (the exact feature stores none)",
                           "score with --feature projected or head for vector-based modes")
    return shards


def read_ids(directory: Path, split: str, as_arrow: bool = False):
    """The split's problem ids in store order: a list, or one pyarrow ChunkedArray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = pa.chunked_array([chunk for s in vector_shards(directory, split)
                            for chunk in pq.read_table(s, columns=["problem_id"]).column("problem_id").chunks],
                           type=pa.string())
    return ids if as_arrow else ids.to_pylist()


def vector_dim(directory: Path, split: str) -> int:
    """The vector width, from the first shard's schema (no data is read)."""
    import pyarrow.parquet as pq

    from gradsel.core.schema import vector_layout

    return vector_layout(pq.read_schema(vector_shards(directory, split)[0]).field("vector"))[0]


READ_ROWS = 16384
READ_BYTES = 512 << 20  # a 7B model's ~200 modules x 256 would make 16,384 rows 3.3 GB of float32


def iter_vectors(directory: Path, split: str, reuse: bool = False) -> Iterator[np.ndarray]:
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
    for shard in vector_shards(directory, split):
        f = pq.ParquetFile(shard, memory_map=True)
        field = f.schema_arrow.field("vector")
        rows = max(1, min(READ_ROWS, READ_BYTES // (4 * vector_layout(field)[0])))
        for batch in f.iter_batches(batch_size=rows, columns=["vector"]):
            stored = stored_vectors(batch.column(0), field)
            if buffer is None or not reuse or buffer.shape[0] < len(stored):
                buffer = np.empty(stored.shape, dtype=np.float32)
            out = buffer[:len(stored)]
            with warnings.catch_warnings():  # a read-only view of the file's bytes: torch only reads it
                warnings.simplefilter("ignore", UserWarning)
                source = torch.from_numpy(np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("=")))
            # torch converts float16 with the CPU's F16C instructions, on every thread (docs/benchmarks.md).
            torch.from_numpy(out).copy_(source)
            yield out
        del f
        pa.default_memory_pool().release_unused()  # Arrow's allocator would keep every freed page


def load_vectors(directory: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(ids, float32 unit vectors) of a whole split: for the validation set and small pools."""
    return read_ids(directory, split), np.concatenate(list(iter_vectors(directory, split)))


def module_bases(queries: np.ndarray, units: int, max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per module, an orthonormal basis of the span of the (m, units * width) queries' slices for
    that module, each slice scaled to unit norm first so every validation problem counts alike.
    At most max_rank (width // 4 by default) directions: with more queries, their top principal
    directions, because a span that fills the slice would hold every candidate whole.
    Returns (bases, live): (units, width, r) float32, zero-padded to a common r, and (units,)
    bool, False for a module in which no query has a gradient."""
    width = queries.shape[1] // units
    slices = queries.reshape(len(queries), units, width).astype(np.float64)  # (m, units, width)
    max_rank = max_rank or max(1, width // 4)
    found = []
    for u in range(units):
        rows = slices[:, u][np.linalg.norm(slices[:, u], axis=1) > 0]
        if not len(rows):
            found.append(np.zeros((width, 0)))
            continue
        _, sv, vt = np.linalg.svd(rows / np.linalg.norm(rows, axis=1, keepdims=True), full_matrices=False)
        found.append(vt[:min(max_rank, int((sv > sv[0] * 1e-6).sum()))].T)
    bases = np.zeros((units, width, max(b.shape[1] for b in found)), dtype=np.float32)
    for u, b in enumerate(found):
        bases[u, :, :b.shape[1]] = b
    return bases, np.array([b.shape[1] > 0 for b in found])


def subspace_share(directory: Path, split: str, queries: np.ndarray, units: int = 1,
                   max_rank: int | None = None) -> np.ndarray:
    """For every vector of the split, the mean over modules of ||P_u c_u|| / ||c_u||: the share of
    the candidate's gradient in module u (its slice c_u) that the validation gradients' span in
    that module (P_u, from module_bases) holds, whatever its sign. A zero slice counts 0. Each
    module weighs the same, so one with a large gradient does not decide alone. One streaming
    pass; (n,) float64."""
    import torch

    bases, live = module_bases(queries, units, max_rank)  # a module with no live query has a zero basis
    bases_t = torch.from_numpy(bases)
    n_live = max(int(live.sum()), 1)
    out = []
    for chunk in iter_vectors(directory, split, reuse=True):
        slices = torch.from_numpy(chunk).view(len(chunk), units, -1)  # (n, units, width): a view
        norms = torch.linalg.vector_norm(slices, dim=-1)  # (n, units)
        inside = torch.empty_like(norms)
        for u in range(units):  # one (n, width) x (width, r) matmul a module, on the strided slice
            inside[:, u] = torch.linalg.vector_norm(slices[:, u] @ bases_t[u], dim=-1)
        shares = torch.where(norms > 0, inside / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
        out.append(shares.sum(1, dtype=torch.float64).numpy() / n_live)
    return np.concatenate(out) if out else np.zeros(0)


def take_vectors(directory: Path, split: str, positions: np.ndarray) -> np.ndarray:
    """float32 vectors at the given store positions, in that order (one pass over the shards)."""
    positions = np.asarray(positions, dtype=np.int64)
    out, start = None, 0
    for chunk in iter_vectors(directory, split):
        if out is None:
            out = np.zeros((len(positions), chunk.shape[1]), dtype=np.float32)
        inside = (positions >= start) & (positions < start + len(chunk))
        out[inside] = chunk[positions[inside] - start]
        start += len(chunk)
    return out


def exact_best(directory: Path, split: str, queries: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted positions, each one's largest inner product with any query row), in one streaming
    pass over the shards: nothing the size of the pool is allocated."""
    positions = np.sort(np.asarray(positions, dtype=np.int64))
    best = np.empty(len(positions), dtype=np.float64)
    start = 0
    for chunk in iter_vectors(directory, split):
        lo, hi = np.searchsorted(positions, [start, start + len(chunk)])
        if hi > lo:
            best[lo:hi] = (chunk[positions[lo:hi] - start] @ queries.T).max(axis=1)
        start += len(chunk)
    return positions, best


def mean_direction(directory: Path, split: str) -> np.ndarray:
    """The unit mean of the split's non-zero vectors (learnalign's target)."""
    total = None
    for chunk in iter_vectors(directory, split):
        s = chunk.sum(axis=0, dtype=np.float64)  # zero vectors add nothing
        total = s if total is None else total + s
    norm = np.linalg.norm(total)
    if norm == 0:
        raise GradselError("every candidate vector is zero", "no problem carries a GRPO signal; rescore with more rollouts")
    return (total / norm).astype(np.float32)


def vectors_fingerprint(directory: Path, split: str) -> str:
    """A digest of the shards' recorded checksums: it changes whenever any shard does."""
    h = hashlib.sha256()
    for shard in vector_shards(directory, split):
        marker = shard_marker(shard)
        h.update(shard.name.encode())
        h.update(marker.read_bytes() if marker.is_file() else str(shard.stat().st_mtime_ns).encode())
    return h.hexdigest()


# -- the index ------------------------------------------------------------------------------------

def resolve_kind(kind: str, n: int) -> str:
    if kind not in INDEX_KINDS:
        raise GradselError(f"unknown --index {kind!r}", f"choose one of {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        return "flat" if n <= AUTO_FLAT_MAX else "ivfpq"
    return kind


def index_params(kind: str, n: int, dim: int) -> dict:
    """sqrt(n) cells (k-means on a 2-core machine stays within minutes at 1M x 2048), each with
    the 39 training points FAISS asks for; PQ with 16 dimensions per one-byte code, fewer
    centroids on tiny pools."""
    params: dict = {"kind": kind, "rows": n, "dim": dim}
    if kind in ("ivf", "ivfpq"):
        params["nlist"] = int(max(1, min(np.sqrt(n), n // 39)))
        params["nprobe"] = int(min(params["nlist"], max(8, params["nlist"] // 16)))
    if kind == "ivfpq":
        m = max(1, dim // 16)
        while dim % m:
            m -= 1
        params["m"] = m
        params["nbits"] = int(min(8, max(1, np.log2(max(n, 2)) - 1)))
    return params


def open_index(directory: Path, split: str = "train", kind: str = "auto"):
    """The split's FAISS index: loaded when saved from the current shards, else built and saved."""
    faiss = faiss_module()
    ids = read_ids(directory, split)
    params = index_params(resolve_kind(kind, len(ids)), len(ids), vector_dim(directory, split))
    params |= {"fingerprint": vectors_fingerprint(directory, split), "version": INDEX_VERSION}
    path = directory / "index" / f"{split}.{params['kind']}.faiss"
    marker = path.with_name(path.name + ".json")
    if path.is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                index = faiss.read_index(str(path))
                _set_nprobe(faiss, index, params)
                return index, ids, params
            console.info(f"the {params['kind']} index in {path.parent} is stale: rebuilding it")
        except (json.JSONDecodeError, RuntimeError, OSError):
            console.info(f"the {params['kind']} index in {path.parent} is unreadable: rebuilding it")
    index = _build(faiss, directory, split, params)
    try:
        from gradsel.core.fsutil import atomic_write_json, atomic_write_with

        atomic_write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))
        atomic_write_json(marker, params)
    except OSError as exc:  # a read-only store still selects; the index is rebuilt next time
        console.info(f"could not save the index beside the vectors ({exc}); using it unsaved")
    return index, ids, params


def _build(faiss, directory: Path, split: str, params: dict):
    dim, n = params["dim"], params["rows"]
    kind = params["kind"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = (faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT) if kind == "ivf"
                 else faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"],
                                       faiss.METRIC_INNER_PRODUCT))
        index.own_fields = True  # the index frees its quantizer
        quantizer.this.disown()
        index.cp.niter = 10  # coarse k-means: 10 iterations place the cells well enough to probe
        # Train on a seeded sample: 40 points per cell, and per PQ centroid.
        want = min(n, max(40 * params["nlist"], 40 * (1 << params["nbits"]) if kind == "ivfpq" else 0))
        sample = np.sort(np.random.default_rng(0).choice(n, size=want, replace=False))
        index.train(take_vectors(directory, split, sample))
        _set_nprobe(faiss, index, params)
    # PQ encoding holds an (m x 2^nbits) float table per vector being added: 512 KiB a vector at
    # 8,192 dimensions, 8.6 GiB for a 16,384-row chunk. Add in slices of about 256 MiB of tables.
    step = max(64, 2**28 // (4 * params["m"] << params["nbits"])) if kind == "ivfpq" else 1 << 30
    with console.progress() as bar:
        task = bar.add_task(f"building the {kind} index", total=n, rate="")
        for chunk in iter_vectors(directory, split):
            for start in range(0, len(chunk), step):
                index.add(chunk[start:start + step])
            bar.advance(task, len(chunk))
    return index


def _set_nprobe(faiss, index, params: dict) -> None:
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]


def flat_matrix(index) -> np.ndarray:
    """The (ntotal, d) float32 vectors inside a flat index, as a view (no copy)."""
    faiss = faiss_module()
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def best_alignment(index, params: dict, queries: np.ndarray, fetch: int, directory: Path, split: str = "train") -> np.ndarray:
    """(ntotal,) float64: each indexed vector's largest inner product with any query row.

    Flat: exact for every vector, in blocks. IVF: the index proposes the `fetch` nearest of each
    query, and those are scored exactly from the stored vectors (so PQ's coarse codes only choose
    the candidates, never their scores); the rest get -inf and rank after every scored one."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if params["kind"] == "flat":
        xb = flat_matrix(index)
        best = np.empty(index.ntotal, dtype=np.float64)
        for start in range(0, index.ntotal, 65536):
            best[start:start + 65536] = (xb[start:start + 65536] @ queries.T).max(axis=1)
        return best
    best = np.full(index.ntotal, -np.inf)
    _, found = index.search(queries, min(fetch, index.ntotal))
    proposed, sims = exact_best(directory, split, queries, np.unique(found[found >= 0]))
    best[proposed] = sims
    return best


def index_alignment(directory: Path, kind: str, queries: np.ndarray, fetch: int) -> dict[str, float]:
    """problem id -> its train vector's best inner product with any query row, through the index
    (best_alignment): learnalign's score and --target max's."""
    index, ids, params = open_index(directory, "train", kind)
    return dict(zip(ids, best_alignment(index, params, queries, fetch, directory).tolist()))
