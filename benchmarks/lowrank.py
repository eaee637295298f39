"""Fidelity of the low-rank alignment by the cap on its cost, offline on a scored store.

    .venv/bin/python -m benchmarks.lowrank --store /tmp/sc4    # a store scored on tiny-arith

Reads the store's rollouts, computes the exact validation gradient G_V (batch aggregation), and
prints, for each cap on the alignment's multiply-adds and each rounding of the ranks
(gradients.truncate_validation_gradient), the share of the exact alignment's work it uses, the ranks it
keeps, and the Spearman correlation of the candidates' dot products <g_p, truncated G_V> with
the exact <g_p, G_V>, over the candidates whose exact dot is non-zero. Same pass, same sketch, so the truncation is the only difference.
If the store was also scored with `--feature exact --modules '\.layers\.\d+\.'`, it prints the
Spearman of each cap's cosines (dot / sketch norm, as `gradsel score` computes score_cos) with the
exact full-gradient cosines too: what the truncation leaves of the scores' fidelity.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def read_split(store: Path, split: str):
    from gradsel.rollout.stage import read_rollouts

    stage = store / "rollouts" / split
    return read_rollouts(stage, len(list(stage.glob("shard-*.parquet"))))


def exact_cosines(store: Path, problem_ids: list[str]):
    """The `--feature exact` cosines of these problems, if the store holds them; else None."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    for spec in sorted(store.glob("features/*/spec.json")):
        if (
            json.loads(spec.read_text())["projector"]["feature"] == "exact"
            and (spec.parent / "scores.parquet").exists()
        ):
            table = pq.read_table(spec.parent / "scores.parquet").to_pydict()
            cos = dict(zip(table["problem_id"], table["score_cos"]))
            return np.array([cos[p] for p in problem_ids])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a store scored with --model tiny-arith")
    ap.add_argument("--caps", type=float, nargs="+", default=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0])
    ap.add_argument(
        "--tiles",
        type=int,
        nargs="+",
        default=[1, 16],
        help="ranks rounded up to a multiple of this (gradsel's default: 16)",
    )
    args = ap.parse_args()

    import numpy as np

    from gradsel.demo.run import spearman
    from gradsel.gradients import (
        LowRank,
        alignment_cost,
        groups_from_table,
        make_spec,
        projected_features,
        truncate_validation_gradient,
        validation_gradient,
    )
    from gradsel.inputs.models import load_causal_lm, load_tokenizer

    model = load_causal_lm("tiny-arith")
    kw = dict(loss_agg="seq-mean-token-mean", pad_id=load_tokenizer("tiny-arith").pad_token_id, max_tokens=2048)
    train = groups_from_table(read_split(args.store, "train"), "grpo")
    val = groups_from_table(read_split(args.store, "val"), "grpo")
    spec = make_spec(model, feature="projected", modules=None, sketch=(16, 16), seed=0, dtype="float32")
    val_grad = validation_gradient(model, val, spec.modules, **kw)
    features, exact = projected_features(model, train, spec, val_grad=val_grad, **kw)
    live = exact != 0
    norms = np.linalg.norm(features, axis=1)
    full_cos = exact_cosines(args.store, [g.problem_id for g in train])
    print(f"{int(live.sum())} candidates with a non-zero dot\n")
    rows = [("exact G_V", 1.0, "all", exact)]
    for cap in args.caps:
        for tile in args.tiles:
            low = truncate_validation_gradient(val_grad, max_cost=cap, tile=tile)
            ranks = [t.out_factor.shape[1] for t in low if isinstance(t, LowRank)]
            _, dots = projected_features(model, train, spec, val_grad=low, **kw)
            rows.append((f"{cap:g}, tile {tile}", alignment_cost(low), f"{min(ranks)}-{max(ranks)}", dots))
    print("| cap, tile | share used | ranks kept | Spearman of the dots | Spearman of the cosines vs exact feature |")
    print("| --- | ---: | --- | ---: | ---: |")
    for cap, used, kept, dots in rows:
        vs_exact = "" if full_cos is None else f"{spearman(dots[live] / norms[live], full_cos[live]):.4f}"
        print(f"| {cap} | {used:.3f} | {kept} | {spearman(dots[live], exact[live]):.4f} | {vs_exact} |")


if __name__ == "__main__":
    main()
