"""The FAISS index over a split's stored vectors (gradsel.store.vectors).

The Parquet shards are the record; the index is derived from them, never the other way round. It
is saved beside them (features/<id>/index/) with a marker that names the shards' checksums, and
rebuilt when they change. The vectors are streamed into it (store.vectors.VectorSet), so no
float32 copy of a whole pool is ever held unless the index itself is flat.

Kinds (`gradsel select --index`):
  flat   exact inner products of unit vectors (cosine); float32, twice the float16 vectors
  ivf    k-means cells, exact inner products inside the nprobe cells nearest a query
  ivfpq  the same with product-quantized codes (dim / 16 bytes a vector): for pools whose vectors
         do not fit in memory; scores are approximate
  auto   flat up to AUTO_FLAT_MAX candidates, ivfpq above
"""

from __future__ import annotations

import json

import numpy as np

from gradsel.core import console
from gradsel.core.choices import INDEX_KINDS
from gradsel.core.errors import GradselError
from gradsel.store.vectors import VectorSet

AUTO_FLAT_MAX = 200_000  # a flat index of 200k x 2048 float32 is 1.6 GB; above that, compress
INDEX_VERSION = 1


def faiss_module():
    try:
        import faiss
    except ImportError as exc:
        raise GradselError(
            "FAISS is not installed", "pip install 'gradsel[cpu]' (faiss-cpu) or 'gradsel[gpu]' (faiss-gpu)"
        ) from exc
    return faiss


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


def open_index(vectors: VectorSet, kind: str = "auto"):
    """The split's FAISS index: loaded when saved from the current shards, else built and saved.
    Returns (index, the split's ids, params)."""
    faiss = faiss_module()
    ids = vectors.ids
    params = index_params(resolve_kind(kind, len(ids)), len(ids), vectors.dim)
    params |= {"fingerprint": vectors.fingerprint, "version": INDEX_VERSION}
    path = vectors.directory / "index" / f"{vectors.split}.{params['kind']}.faiss"
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
    index = _build(faiss, vectors, params)
    try:
        from gradsel.core.fsutil import atomic_write_json, atomic_write_with

        atomic_write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))
        atomic_write_json(marker, params)
    except OSError as exc:  # a read-only store still selects; the index is rebuilt next time
        console.info(f"could not save the index beside the vectors ({exc}); using it unsaved")
    return index, ids, params


def _build(faiss, vectors: VectorSet, params: dict):
    dim, n = params["dim"], params["rows"]
    kind = params["kind"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = (
            faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            if kind == "ivf"
            else faiss.IndexIVFPQ(
                quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
            )
        )
        index.own_fields = True  # the index frees its quantizer
        quantizer.this.disown()
        index.cp.niter = 10  # coarse k-means: 10 iterations place the cells well enough to probe
        # Train on a seeded sample: 40 points per cell, and per PQ centroid.
        want = min(n, max(40 * params["nlist"], 40 * (1 << params["nbits"]) if kind == "ivfpq" else 0))
        sample = np.sort(np.random.default_rng(0).choice(n, size=want, replace=False))
        index.train(vectors.take(sample))
        _set_nprobe(faiss, index, params)
    # PQ encoding holds an (m x 2^nbits) float table per vector being added: 512 KiB a vector at
    # 8,192 dimensions, 8.6 GiB for a 16,384-row chunk. Add in slices of about 256 MiB of tables.
    step = max(64, 2**28 // (4 * params["m"] << params["nbits"])) if kind == "ivfpq" else 1 << 30
    with console.progress() as bar:
        task = bar.add_task(f"building the {kind} index", total=n, rate="")
        for chunk in vectors.batches():
            for start in range(0, len(chunk), step):
                index.add(chunk[start : start + step])
            bar.advance(task, len(chunk))
    return index


def _set_nprobe(faiss, index, params: dict) -> None:
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]


def flat_matrix(index) -> np.ndarray:
    """The (ntotal, d) float32 vectors inside a flat index, as a view (no copy)."""
    faiss = faiss_module()
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def best_alignment(index, params: dict, queries: np.ndarray, fetch: int, vectors: VectorSet) -> np.ndarray:
    """(ntotal,) float64: each indexed vector's largest inner product with any query row.

    Flat: exact for every vector, in blocks. IVF: the index proposes the `fetch` nearest of each
    query, and those are scored exactly from the stored vectors (so PQ's coarse codes only choose
    the candidates, never their scores); the rest get -inf and rank after every scored one."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if params["kind"] == "flat":
        xb = flat_matrix(index)
        best = np.empty(index.ntotal, dtype=np.float64)
        for start in range(0, index.ntotal, 65536):
            best[start : start + 65536] = (xb[start : start + 65536] @ queries.T).max(axis=1)
        return best
    best = np.full(index.ntotal, -np.inf)
    _, found = index.search(queries, min(fetch, index.ntotal))
    proposed, sims = vectors.best_inner_products(queries, np.unique(found[found >= 0]))
    best[proposed] = sims
    return best


def index_alignment(vectors: VectorSet, kind: str, queries: np.ndarray, fetch: int) -> dict[str, float]:
    """problem id -> its vector's best inner product with any query row, through the index
    (best_alignment): learnalign's score and --target max's."""
    index, ids, params = open_index(vectors, kind)
    return dict(zip(ids, best_alignment(index, params, queries, fetch, vectors).tolist()))
