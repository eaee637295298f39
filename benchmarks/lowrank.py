"""Fidelity of the low-rank alignment by the cap on its cost, offline on a scored store.

    .venv/bin/python benchmarks/lowrank.py --store /tmp/sc4    # a store scored on tiny-arith

Reads the store's rollouts, computes the exact validation gradient G_V (batch aggregation), and
prints, for each cap on the alignment's multiply-adds (gradients.low_rank_target), the share of
the exact alignment's work it uses, the ranks it keeps, and the Spearman correlation of the
candidates' dot products <g_p, truncated G_V> with the exact <g_p, G_V>, over the candidates whose
exact dot is non-zero. Same pass, same sketch, so the truncation is the only difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def read_split(store: Path, split: str):
    from gradsel.schema import ROLLOUTS
    from gradsel.store import read_shards

    stage = store / "rollouts" / split
    return read_shards(stage, len(list(stage.glob("shard-*.parquet"))), ROLLOUTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a store scored with --model tiny-arith")
    ap.add_argument("--caps", type=float, nargs="+", default=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0])
    args = ap.parse_args()

    from gradsel.demo import spearman
    from gradsel.gradients import (LowRank, alignment_cost, groups_from_table, low_rank_target, make_spec,
                                   projected_features, target_gradient)
    from gradsel.models import load_causal_lm, load_tokenizer

    model = load_causal_lm("tiny-arith")
    kw = dict(loss_agg="seq-mean-token-mean", pad_id=load_tokenizer("tiny-arith").pad_token_id, max_tokens=2048)
    train = groups_from_table(read_split(args.store, "train"), "grpo")
    val = groups_from_table(read_split(args.store, "val"), "grpo")
    spec = make_spec(model, feature="projected", modules=None, sketch=(16, 16), seed=0, dtype="float32")
    target = target_gradient(model, val, spec.modules, **kw)
    _, exact = projected_features(model, train, spec, target=target, **kw)
    live = exact != 0
    print(f"{int(live.sum())} candidates with a non-zero dot\n")
    print("| cap | share used | ranks kept | Spearman of the dots |\n| ---: | ---: | --- | ---: |")
    for cap in args.caps:
        low = low_rank_target(target, max_cost=cap)
        ranks = [t.out_factor.shape[1] for t in low if isinstance(t, LowRank)]
        _, dots = projected_features(model, train, spec, target=low, **kw)
        print(f"| {cap:g} | {alignment_cost(low):.3f} | {min(ranks)}-{max(ranks)} | {spearman(dots[live], exact[live]):.4f} |")


if __name__ == "__main__":
    main()
