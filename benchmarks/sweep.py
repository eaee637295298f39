"""What the rollout budget and the sketch size buy, in the paper's three regimes.

    .venv/bin/python -m benchmarks.sweep [--regimes noisy imbalance low-utility] [--seeds 0 1]
                                         [--size 400] [--ks 4 8 16] [--sketches 8 16 32]

For each regime and seed: one pool from `gradsel demo-data`; for each k, rollouts with the
transformers engine and the default score; at k = 8 also every sketch size, with the default
exact alignment and with `--alignment sketch`. Each score is followed by `select --ratio 0.25`
with gradalign, reliable, accgreedy and random. Prints, and writes to docs/research/sweep.md, mean +- std
over seeds of each regime's metric among the selected (noisy: corrupted share; imbalance: target
share; low-utility: useful share) and the AUROC of each mode's score (wanted over not wanted).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.quality import auroc
from benchmarks.truth import regime_truth
from gradsel.core import console
from gradsel.demo.tasks import write_regime
from gradsel.gradients.stage import ScoreConfig
from gradsel.pipeline.score import RolloutOptions, run_score
from gradsel.selection.select import SelectConfig, mode_scores, select
from gradsel.store.directory import open_store
from gradsel.store.vectors import VectorSet

MODES = ("gradalign", "reliable", "accgreedy", "random")


METRIC = {
    "noisy": "corrupted share (lower is better)",
    "imbalance": "target-domain share",
    "low-utility": "useful share",
}


def measure(store_dir: Path, result, wanted: dict[str, bool], regime: str, seed: int) -> dict[str, tuple[float, float]]:
    """mode -> (the regime's metric among the selected, AUROC wanted > not wanted)."""
    store = open_store(store_dir)
    directory = store.root / store.read_manifest()["features"]
    train, val = VectorSet(directory, "train"), VectorSet(directory, "val")
    rows = [r for r in result.scores.to_pylist() if r["split"] == "train" and not r["zero_advantage"]]
    out = {}
    for mode in MODES:
        chosen = select(store, SelectConfig(mode=mode, ratio=0.25, seed=seed, allow_fewer=True)).problem_ids
        scores = mode_scores(rows, SelectConfig(mode=mode, all=True, seed=seed), train, val, fetch=len(rows))
        good = [scores[r["problem_id"]] for r in rows if wanted[r["problem_id"]]]
        bad = [scores[r["problem_id"]] for r in rows if not wanted[r["problem_id"]]]
        share = sum(wanted[p] for p in chosen) / max(len(chosen), 1)
        out[mode] = (1 - share if regime == "noisy" else share, auroc(good, bad))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=["noisy", "imbalance", "low-utility"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--sketches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--out", type=Path, default=Path("docs/research/sweep.md"))
    ap.add_argument("--model", default="tiny-arith", help="checkpoint to score with (default the bundled model)")
    args = ap.parse_args()
    console.set_verbosity(quiet=True)
    results: dict[tuple, list[dict]] = {}  # (regime, k, sketch, alignment) -> per-seed {mode: (metric, auroc)}
    base: dict[str, list[float]] = {}
    for regime in args.regimes:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as work:
                pool, val = write_regime(Path(work) / "data", regime, size=args.size, val_size=40, seed=seed)
                wanted = regime_truth(Path(work) / "data", regime)
                rate = sum(wanted.values()) / len(wanted)
                base.setdefault(regime, []).append(1 - rate if regime == "noisy" else rate)
                for k in args.ks:
                    store = Path(work) / f"store-k{k}"
                    ro = RolloutOptions(n=k, engine="hf", max_tokens=8, seed=seed)
                    configs = [(16, "exact")]
                    if k == 8:
                        configs = [(s, a) for a in ("exact", "sketch") for s in args.sketches]
                    for sketch, alignment in configs:
                        result = run_score(
                            store,
                            model=args.model,
                            pool=pool,
                            val=val,
                            ro=ro,
                            sc=ScoreConfig(seed=seed, sketch=(sketch, sketch), alignment=alignment),
                        )
                        key = (regime, k, sketch, alignment)
                        results.setdefault(key, []).append(measure(store, result, wanted, regime, seed))
                        print(
                            f"{regime} seed {seed} k {k} sketch {sketch}x{sketch} {alignment}: "
                            + ", ".join(f"{m} {v[0]:.1%}/{v[1]:.3f}" for m, v in results[key][-1].items()),
                            flush=True,
                        )
    lines = [
        "# Rollout budget and sketch size",
        "",
        "Measured with:",
        "",
        "```bash",
        f".venv/bin/python -m benchmarks.sweep --regimes {' '.join(args.regimes)} "
        f"--seeds {' '.join(map(str, args.seeds))} --size {args.size} --ks {' '.join(map(str, args.ks))} "
        f"--sketches {' '.join(map(str, args.sketches))}",
        "```",
        "",
        f"{args.size}-problem pools from `gradsel demo-data`, 40 clean validation problems, tiny-arith, "
        "transformers engine, select 25%. Each cell: the regime's metric among the selected / AUROC of the "
        f"mode's score for wanted over unwanted problems, mean +- std over {len(args.seeds)} seeds.",
    ]
    for regime in args.regimes:
        lines += [
            "",
            f"## {regime}: {METRIC[regime]}, pool base rate {statistics.mean(base[regime]):.1%}",
            "",
            "| k | sketch | alignment | " + " | ".join(MODES) + " |",
            "| ---: | --- | --- |" + " --- |" * len(MODES),
        ]
        for (reg, k, sketch, alignment), runs in sorted(results.items()):
            if reg != regime:
                continue
            cells = []
            for mode in MODES:
                shares = [r[mode][0] for r in runs]
                aucs = [r[mode][1] for r in runs]
                cells.append(
                    f"{statistics.mean(shares):.1%} +- {statistics.pstdev(shares):.1%} / {statistics.mean(aucs):.3f}"
                )
            lines.append(f"| {k} | {sketch}x{sketch} | {alignment} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
