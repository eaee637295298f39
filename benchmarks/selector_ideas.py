"""Candidate selector scores, measured offline on stores that `benchmarks/quality.py --keep` kept.

    .venv/bin/python -m benchmarks.quality --seeds 0 1 2 --regimes wrong-answer noisy imbalance low-utility \\
        --features projected --out /tmp/q.md --keep /tmp/stores
    .venv/bin/python -m benchmarks.selector_ideas /tmp/stores/*

Each idea is a score over the stored projected vectors (unit vectors, one slice per module) of
the pool's candidates (non-zero advantage), and every one keeps the default's judge-consistency
penalty, -2 x (1 - consistency), so that only the gradient term differs. Printed per regime:
the wanted share of the top 25% (as quality.py) and the AUROC of wanted over unwanted
candidates, mean over the stores given. docs/research/quality.md records what these showed.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from benchmarks.quality import auroc
from benchmarks.truth import regime_truth
from gradsel.selection.select import load_scores
from gradsel.selection.targets import module_bases
from gradsel.store.directory import open_store
from gradsel.store.vectors import VectorSet


def unit(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)


def neighbour_agreement(X: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """Mean signed cosine with the k other candidates of largest |cosine|: a wrong label should
    point against the part of its gradient that its correctly labelled neighbours share."""
    G = X @ X[live].T  # (n, candidates)
    G[np.where(live)[0], np.arange(live.sum())] = 0  # not oneself
    nearest = np.argsort(-np.abs(G), axis=1)[:, :k]
    return np.take_along_axis(G, nearest, axis=1).mean(1)


def ideas(X: np.ndarray, V: np.ndarray, units: int, live: np.ndarray, sources: np.ndarray) -> dict[str, np.ndarray]:
    """(n,) score per idea for the (n, units * width) candidate vectors X, validation vectors V."""
    S = X.reshape(len(X), units, -1)  # (n, units, width)
    bases, _ = module_bases(V, units)  # (units, width, r): the validation span per module
    inside = np.einsum("nuw,uwr->nur", S, bases)
    squared = np.einsum("nuw,nuw->nu", S, S)
    share = np.sqrt(np.divide((inside**2).sum(-1), squared, out=np.zeros_like(squared), where=squared > 0))
    pool_in_span = np.einsum("nuw,uwr->ur", unit(S[live]), bases)
    preconditioned = unit(X / np.sqrt((X[live] ** 2).mean(0) + 1e-8))  # Adam-style: the pool's second moments
    sign_vs_pool = np.einsum("nur,ur->nu", unit(inside), unit(pool_in_span))  # per module, in the span
    out = {
        "subspace (the default)": share.mean(1),
        "validation mean (gradalign)": X @ unit(V.mean(0)),
        "pool mean (learnalign)": X @ unit(X[live].mean(0)),
        "pool mean, per module": np.einsum("nuw,uw->n", unit(S), unit(unit(S[live]).mean(0))) / units,
        "pool mean, preconditioned": preconditioned @ unit(preconditioned[live].mean(0)),
        "subspace x cos with the pool mean in the span": (share * sign_vs_pool).mean(1),
    }
    for k in (10, 50):
        out[f"{k} nearest neighbours' signed cosine"] = neighbour_agreement(X, live, k)
    per_source = np.zeros(len(X))
    for source in set(sources):
        rows = sources == source
        per_source[rows] = X[rows] @ unit(X[rows & live].mean(0))
    out["pool mean of the same data source"] = per_source
    pool = out["pool mean (learnalign)"]
    for lam in (0.5, 1.0, 2.0):
        out[f"subspace + {lam} x pool mean"] = out["subspace (the default)"] + lam * pool
        out[f"subspace + {lam} x min(0, pool mean)"] = out["subspace (the default)"] + lam * np.minimum(pool, 0)
    return out


def measure(work: Path) -> tuple[str, dict[str, tuple[float, float]]]:
    regime = work.name.rsplit("-", 1)[0]
    truth = regime_truth(work / "data", regime)
    _, scores, directory = load_scores(open_store(work / "store"))
    rows = {r["problem_id"]: r for r in scores if r["split"] == "train"}
    units = len(json.loads((directory / "spec.json").read_text())["projector"]["modules"])
    train = VectorSet(directory, "train")
    ids, X = train.ids, train.load()
    V = VectorSet(directory, "val").load()
    V = V[np.linalg.norm(V, axis=1) > 0]
    live = np.array([not rows[p]["zero_advantage"] for p in ids])
    consistency = np.array(
        [1.0 if rows[p].get("judge_consistency") is None else rows[p]["judge_consistency"] for p in ids]
    )
    sources = np.array([rows[p]["data_source"] for p in ids])
    k = round(0.25 * len(truth))
    out = {}
    for name, score in ideas(X, V, units, live, sources).items():
        score = score - 2 * (1 - consistency)
        cand = np.where(live)[0]
        top = cand[np.argsort(-score[cand], kind="stable")[:k]]
        out[name] = (
            float(np.mean([truth[ids[i]] for i in top])),
            auroc([score[i] for i in cand if truth[ids[i]]], [score[i] for i in cand if not truth[ids[i]]]),
        )
    return regime, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+", type=Path, help="REGIME-SEED folders kept by quality.py --keep")
    args = ap.parse_args()
    table: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for work in args.stores:
        regime, found = measure(work)
        for name, value in found.items():
            table[(regime, name)].append(value)
    print("| regime | score | wanted share of the top 25% | AUROC |\n| --- | --- | ---: | ---: |")
    for (regime, name), values in sorted(table.items(), key=lambda kv: kv[0][0]):
        shares, aucs = zip(*values)
        print(f"| {regime} | {name} | {np.mean(shares):.1%} | {np.mean(aucs):.3f} |")


if __name__ == "__main__":
    main()
