"""The validation targets: what a candidate's gradient is compared with under `--target`.

  mean      the validation set's gradient direction; its cosine is the scores table's score_cos
  max       the best cosine with any single validation problem (through the FAISS index,
            gradsel.selection.index), over live_validation_vectors
  subspace  per module, the share of the candidate's gradient that the validation gradients'
            span holds, averaged over the modules (subspace_share)
  auto      resolve_target: mean for the paper's modes, subspace for reliable
learnalign's target, with no validation set, is the candidates' own mean direction (mean_direction).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from gradsel.core.errors import GradselError
from gradsel.store.vectors import VectorSet


def resolve_target(target: str, feature: str, mode: str) -> str:
    """What `auto` means for a mode. The paper's modes (gradalign, dot, simacc) align with the
    validation gradient, so for them it is mean: `--mode gradalign` is the paper's method as
    published. For gradsel's default, reliable, it is subspace (the best of the targets across the
    regimes of docs/quality.md) where the store holds gradient vectors; the exact feature stores
    none, so there every mode's is mean. Modes that read no target get mean, which they ignore."""
    if feature == "exact":
        if target in ("max", "subspace"):
            raise GradselError(
                f"--target {target} needs gradient vectors, and the exact feature stores none",
                "use --target mean, or select from a projected or head store",
            )
        return "mean"
    if target != "auto":
        return target
    return "subspace" if mode == "reliable" else "mean"


def subspace_scores(ids: list[str], rows: np.ndarray, train: VectorSet, val: VectorSet) -> np.ndarray:
    """Each candidate's share in the validation span (subspace_share), in the order of `ids`
    (the candidates' problem ids, `rows` their rows in the scores table)."""
    shares = _subspace_shares(train.directory, train.fingerprint, val.fingerprint)
    return shares[_store_positions(ids, rows, train)]


@functools.lru_cache(maxsize=1)
def _subspace_shares(directory: Path, train_fingerprint: str, val_fingerprint: str) -> np.ndarray:
    """The shares in store order, computed once per version of the vectors (the fingerprints):
    the report selects with several modes, each of which would read every vector again. Keyed by
    plain values, so that the cache keeps no VectorSet (and its million ids) alive."""
    units = len(json.loads((directory / "spec.json").read_text())["projector"]["modules"])
    shares = subspace_share(VectorSet(directory, "train"), live_validation_vectors(VectorSet(directory, "val")), units)
    shares.flags.writeable = False  # shared between callers
    return shares


def _store_positions(ids: list[str], rows: np.ndarray, train: VectorSet) -> np.ndarray:
    """Where each candidate's vector sits in the train split. The scores table lists that split
    in store order, so a candidate's row is its position; that is checked, and a store whose
    orders differ is looked up id by id (a dict of a million ids costs about a second)."""
    import pyarrow as pa

    stored = train.ids_arrow
    if len(ids) and len(stored) > rows.max() and stored.take(rows).equals(pa.chunked_array([pa.array(ids)])):
        return rows
    position = {pid: i for i, pid in enumerate(stored.to_pylist())}
    return np.fromiter((position[pid] for pid in ids), dtype=np.int64, count=len(ids))


def live_validation_vectors(val: VectorSet) -> np.ndarray:
    """(m, dim) unit vectors of the validation problems with a GRPO signal (zero rows dropped)."""
    vectors = val.load()
    return vectors[np.linalg.norm(vectors, axis=1) > 0]


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
        found.append(vt[: min(max_rank, int((sv > sv[0] * 1e-6).sum()))].T)
    bases = np.zeros((units, width, max(b.shape[1] for b in found)), dtype=np.float32)
    for u, b in enumerate(found):
        bases[u, :, : b.shape[1]] = b
    return bases, np.array([b.shape[1] > 0 for b in found])


def subspace_share(vectors: VectorSet, queries: np.ndarray, units: int = 1, max_rank: int | None = None) -> np.ndarray:
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
    for chunk in vectors.batches(reuse=True):
        slices = torch.from_numpy(chunk).view(len(chunk), units, -1)  # (n, units, width): a view
        norms = torch.linalg.vector_norm(slices, dim=-1)  # (n, units)
        inside = torch.empty_like(norms)
        for u in range(units):  # one (n, width) x (width, r) matmul a module, on the strided slice
            inside[:, u] = torch.linalg.vector_norm(slices[:, u] @ bases_t[u], dim=-1)
        shares = torch.where(norms > 0, inside / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
        out.append(shares.sum(1, dtype=torch.float64).numpy() / n_live)
    return np.concatenate(out) if out else np.zeros(0)


def mean_direction(vectors: VectorSet) -> np.ndarray:
    """The unit mean of the split's non-zero vectors (learnalign's target)."""
    total = None
    for chunk in vectors.batches():
        s = chunk.sum(axis=0, dtype=np.float64)  # zero vectors add nothing
        total = s if total is None else total + s
    norm = np.linalg.norm(total)
    if norm == 0:
        raise GradselError(
            "every candidate vector is zero", "no problem carries a GRPO signal; rescore with more rollouts"
        )
    return (total / norm).astype(np.float32)
