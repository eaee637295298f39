"""What the rollout budget and the sketch size buy: the noisy regime over k and sketch sizes.

    .venv/bin/python benchmarks/sweep.py [--seeds 0 1 2] [--size 400] [--ks 4 8 16] [--sketches 8 16 32]

For each seed: one noisy pool (50% coin-flip judges); for each k, rollouts with the transformers
engine and the default score; at k = 8 also every sketch size, with the default exact alignment
and with `--alignment sketch`. Each score is followed by `select --ratio 0.25` with gradalign,
reliable, accgreedy and random. Prints, and writes to docs/sweep.md, mean +- std over seeds of
the corrupted share among the selected and the AUROC of each mode's score (clean > corrupted).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from gradsel import console
from gradsel.pipeline import RolloutOptions, run_score
from gradsel.problems import read_problems
from gradsel.score import ScoreConfig
from gradsel.select import SelectConfig, mode_scores, select
from gradsel.store import open_store
from gradsel.tasks import write_regime

from quality import auroc  # benchmarks/quality.py

MODES = ("gradalign", "reliable", "accgreedy", "random")


def measure(store_dir: Path, result, clean: dict[str, bool], seed: int) -> dict[str, tuple[float, float]]:
    """mode -> (corrupted share among the selected, AUROC clean > corrupted)."""
    store = open_store(store_dir)
    directory = store.root / store.read_manifest()["features"]
    rows = [r for r in result.scores.to_pylist() if r["split"] == "train" and not r["zero_advantage"]]
    out = {}
    for mode in MODES:
        chosen = select(store, SelectConfig(mode=mode, ratio=0.25, seed=seed, allow_fewer=True)).problem_ids
        scores = mode_scores(rows, SelectConfig(mode=mode, all=True, seed=seed), directory, fetch=len(rows))
        good = [scores[r["problem_id"]] for r in rows if clean[r["problem_id"]]]
        bad = [scores[r["problem_id"]] for r in rows if not clean[r["problem_id"]]]
        out[mode] = (1 - sum(clean[p] for p in chosen) / max(len(chosen), 1), auroc(good, bad))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--sketches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--out", type=Path, default=Path("docs/sweep.md"))
    args = ap.parse_args()
    console.set_verbosity(quiet=True)
    results: dict[tuple, list[dict]] = {}  # (k, sketch, alignment) -> per-seed {mode: (share, auroc)}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            pool, val = write_regime(Path(work) / "data", "noisy", size=args.size, val_size=40, seed=seed)
            clean = {p.problem_id: not p.extra_info["corrupted"] for p in read_problems(pool).problems}
            for k in args.ks:
                store = Path(work) / f"store-k{k}"
                ro = RolloutOptions(n=k, engine="hf", max_tokens=8, seed=seed)
                configs = [(16, "exact")]
                if k == 8:
                    configs = [(s, a) for a in ("exact", "sketch") for s in args.sketches]
                for sketch, alignment in configs:
                    result = run_score(store, model="tiny-arith", pool=pool, val=val, ro=ro,
                                       sc=ScoreConfig(seed=seed, sketch=(sketch, sketch), alignment=alignment))
                    results.setdefault((k, sketch, alignment), []).append(measure(store, result, clean, seed))
                    print(f"seed {seed} k {k} sketch {sketch}x{sketch} {alignment}: "
                          + ", ".join(f"{m} {v[0]:.1%}/{v[1]:.3f}" for m, v in results[(k, sketch, alignment)][-1].items()),
                          flush=True)
    lines = ["# Rollout budget and sketch size (noisy regime)", "", "Measured with:", "", "```bash",
             f".venv/bin/python benchmarks/sweep.py --seeds {' '.join(map(str, args.seeds))} --size {args.size} "
             f"--ks {' '.join(map(str, args.ks))} --sketches {' '.join(map(str, args.sketches))}", "```", "",
             f"{args.size}-problem noisy pool (half the problems judged by a coin flip), 40 clean validation "
             "problems, tiny-arith, transformers engine, select 25%. Each cell: corrupted share among the "
             "selected (lower is better) / AUROC of the mode's score for clean over corrupted, mean +- std "
             f"over {len(args.seeds)} seeds.", "",
             "| k | sketch | alignment | " + " | ".join(MODES) + " |", "| ---: | --- | --- |" + " --- |" * len(MODES)]
    for (k, sketch, alignment), runs in sorted(results.items()):
        cells = []
        for mode in MODES:
            shares = [r[mode][0] for r in runs]
            aucs = [r[mode][1] for r in runs]
            cells.append(f"{statistics.mean(shares):.1%} +- {statistics.pstdev(shares):.1%} / "
                         f"{statistics.mean(aucs):.3f}")
        lines.append(f"| {k} | {sketch}x{sketch} | {alignment} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
