"""Selection quality on the paper's three data regimes, with tiny-arith, over several seeds.

    .venv/bin/python -m benchmarks.quality [--seeds 0 1 2] [--size 400] [--n 8] [--n-val N] [--val-size 40] [--sketch 16x16]
        [--out docs/research/quality.md]

For each regime and seed: `gradsel demo-data`, then `score` (transformers engine) with each
feature, then `select --ratio 0.25` with every mode. Metrics (mean +- std over seeds):
  noisy        corrupted share among the selected (lower is better); AUROC clean > corrupted of
               the mode's score over non-zero-advantage candidates
  imbalance    target-domain share among the selected, and its ratio to the pool's base rate
  low-utility  useful share among the selected, and its ratio to the base rate; the same AUROC
  wrong-answer share of rows with a wrong reference answer among the selected (lower is better),
               read from the side file `pool.truth.json`, which no selector sees; the same AUROC.
               `--wrong-keys model`: each wrong key is the scoring model's own commonest wrong
               answer to the problem (32 samples at T=1), as a key written by a model is, instead
               of a synthetic slip
The `ceiling (oracle)` row is the best share any selector of non-zero-advantage problems can reach.
The `reliable --target subspace, without the judge's contract` row is the default as it ranked
before the contract (rewards.breaks_contract), on the same stores. Each AUROC carries a bootstrap
95% interval (candidates resampled within each seed, 1000 times, the mean over seeds).
`--noise-fraction`: the share of the noisy regime's pool judged by a coin flip (default 0.5).
`--model smollm2`: the real-model test bed (benchmarks/smollm2_bed.py): SmolLM2-135M-Instruct on
small sums in verl GSM8K-shaped chat rows, judged by `#### N`, k rollouts at T = 1.0, at most 16
tokens; its wrong keys are always the model's own (`--wrong-keys` is ignored).
Writes a Markdown report with a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import smollm2_bed
from benchmarks.truth import model_wrong_key, regime_truth
from gradsel.core import console
from gradsel.demo.tasks import write_regime
from gradsel.gradients.stage import ScoreConfig, parse_sketch
from gradsel.pipeline.score import RolloutOptions, run_score
from gradsel.selection.modes import MODES
from gradsel.selection.select import SelectConfig, mode_scores, select
from gradsel.store.directory import open_store
from gradsel.store.vectors import VectorSet

FEATURES = {"projected": {}, "head": {"feature": "head"}, "exact": {"feature": "exact", "modules": r"\.layers\.\d+\."}}
VECTOR_FREE = ("gradalign", "dot", "accgreedy", "band", "simacc", "random", "reliable")


def auroc(good: list[float], bad: list[float]) -> float:
    """P(a wanted problem scores above an unwanted one), ties counted half (Mann-Whitney, by ranks)."""
    if len(good) == 0 or len(bad) == 0:
        return float("nan")
    x = np.concatenate([np.asarray(good, np.float64), np.asarray(bad, np.float64)])
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average ranks, 1-based
    n_good, n_bad = len(good), len(bad)
    return float((ranks[:n_good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


BOOTSTRAP = 1000


def bootstrap_interval(per_seed: list[tuple[list[float], list[float]]], reps: int = BOOTSTRAP) -> tuple[float, float]:
    """A 95% interval for the mean over seeds of the AUROC: each seed's wanted and unwanted
    candidates resampled with replacement (seeded), the 2.5th and 97.5th percentiles."""
    per_seed = [(np.asarray(g), np.asarray(b)) for g, b in per_seed if len(g) and len(b)]
    if not per_seed:
        return float("nan"), float("nan")
    rng = np.random.default_rng(0)
    means = [
        np.mean([auroc(g[rng.integers(0, len(g), len(g))], b[rng.integers(0, len(b), len(b))]) for g, b in per_seed])
        for _ in range(reps)
    ]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def run_one(
    work: Path,
    regime: str,
    seed: int,
    size: int,
    n: int,
    features: list[str],
    val_size: int = 40,
    sketch: tuple[int, int] = (16, 16),
    n_val: int | None = None,
    model: str = "tiny-arith",
    wrong_key=None,
    noise_fraction: float = 0.5,
) -> list[dict]:
    bed = model == "smollm2"
    writer = smollm2_bed.write_regime if bed else write_regime
    pool, val = writer(
        work / "data",
        regime,
        size=size,
        val_size=val_size,
        seed=seed,
        wrong_key=wrong_key,
        noise_fraction=noise_fraction,
    )
    truth = regime_truth(work / "data", regime)
    base_rate = sum(truth.values()) / len(truth)
    if bed:
        model = str(smollm2_bed.model_path())
        ro = RolloutOptions(
            n=n,
            n_val=n_val,
            engine="hf",
            max_tokens=smollm2_bed.MAX_TOKENS,
            temperature=smollm2_bed.TEMPERATURE,
            seed=seed,
        )
    else:
        ro = RolloutOptions(n=n, n_val=n_val, engine="hf", max_tokens=8, seed=seed)
    results = []
    for feature in features:
        result = run_score(
            work / "store",
            model=model,
            pool=pool,
            val=val,
            ro=ro,
            sc=ScoreConfig(seed=seed, sketch=sketch, **FEATURES[feature]),
        )
        store = open_store(work / "store")
        modes = VECTOR_FREE if feature == "exact" else MODES
        rows = [r for r in result.scores.to_pylist() if r["split"] == "train" and not r["zero_advantage"]]
        # LESS-style --target max (best alignment with any one validation problem) needs the vectors.
        selectors = [(m, "mean") for m in modes] + (
            [] if feature == "exact" else [(m, t) for t in ("max", "subspace") for m in ("gradalign", "reliable")]
        )
        for mode, target in selectors:
            if feature != "projected" and mode in ("accgreedy", "band", "random"):
                continue  # these ignore gradients: one feature is enough
            cfg = SelectConfig(
                mode=mode,
                ratio=0.25,
                seed=seed,
                allow_fewer=True,
                target=target,
                band=(0.2, 0.8) if mode == "band" else (0.0, 1.0),
            )
            chosen = select(store, cfg).problem_ids
            scores = mode_scores(
                rows, SelectConfig(mode=mode, all=True, target=target), *_vector_sets(store), fetch=len(rows)
            )
            good = [scores[r["problem_id"]] for r in rows if truth[r["problem_id"]]]
            bad = [scores[r["problem_id"]] for r in rows if not truth[r["problem_id"]]]
            share = sum(truth[p] for p in chosen) / max(len(chosen), 1)
            results.append(
                {
                    "regime": regime,
                    "seed": seed,
                    "feature": feature,
                    "mode": mode if target == "mean" else f"{mode} --target {target}",
                    "good_share": share,
                    "base_rate": base_rate,
                    "auroc": auroc(good, bad),
                    "good_scores": good,
                    "bad_scores": bad,
                    "selected": len(chosen),
                }
            )
        if feature == "projected":
            results.append(
                _without_contract(result.scores.to_pylist(), rows, truth, store, regime, seed, feature, base_rate)
            )
        if feature == features[0]:
            # The ceiling: an oracle that ranks every non-zero-advantage good problem first. Zero-
            # advantage problems carry no GRPO gradient, so no gradient selector can prefer them.
            k = round(0.25 * size)
            results.append(
                {
                    "regime": regime,
                    "seed": seed,
                    "feature": feature,
                    "mode": "ceiling (oracle)",
                    "good_share": min(sum(truth[r["problem_id"]] for r in rows), k) / k,
                    "base_rate": base_rate,
                    "auroc": 1.0,
                    "selected": k,
                }
            )
    return results


def _without_contract(
    all_rows: list[dict], rows: list[dict], truth: dict, store, regime: str, seed: int, feature: str, base_rate: float
) -> dict:
    """The default (`reliable --target subspace`) as it ranked before the judge's contract: the same
    candidates with every `breaks_contract` cleared, the top 25% of the pool taken as `select` takes
    them (score descending, ties by problem id)."""
    cleared = [r | {"breaks_contract": False} for r in rows]
    scores = mode_scores(
        cleared, SelectConfig(mode="reliable", all=True, target="subspace"), *_vector_sets(store), fetch=len(rows)
    )
    k = min(round(0.25 * sum(r["split"] == "train" for r in all_rows)), len(rows))
    chosen = sorted(scores, key=lambda pid: (-scores[pid], pid))[:k]
    good = [scores[r["problem_id"]] for r in rows if truth[r["problem_id"]]]
    bad = [scores[r["problem_id"]] for r in rows if not truth[r["problem_id"]]]
    return {
        "regime": regime,
        "seed": seed,
        "feature": feature,
        "mode": "reliable --target subspace, without the judge's contract",
        "good_share": sum(truth[p] for p in chosen) / max(len(chosen), 1),
        "base_rate": base_rate,
        "auroc": auroc(good, bad),
        "good_scores": good,
        "bad_scores": bad,
        "selected": len(chosen),
    }


def _vector_sets(store) -> tuple[VectorSet, VectorSet]:
    """The train and val vectors of the store's current features."""
    directory = store.root / store.read_manifest()["features"]
    return VectorSet(directory, "train"), VectorSet(directory, "val")


def summarize(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["regime"], r["feature"], r["mode"]), []).append(r)
    out = []
    for (regime, feature, mode), rs in groups.items():
        shares = [r["good_share"] for r in rs]
        aucs = [r["auroc"] for r in rs if r["auroc"] == r["auroc"]]
        lo, hi = bootstrap_interval([(r["good_scores"], r["bad_scores"]) for r in rs if "good_scores" in r])
        out.append(
            {
                "regime": regime,
                "feature": feature,
                "mode": mode,
                "seeds": len(rs),
                "good_mean": statistics.mean(shares),
                "good_std": statistics.pstdev(shares),
                "base_rate": statistics.mean(r["base_rate"] for r in rs),
                "auroc_mean": statistics.mean(aucs) if aucs else float("nan"),
                "auroc_std": statistics.pstdev(aucs) if len(aucs) > 1 else 0.0,
                "auroc_ci95": [lo, hi],
            }
        )
    return out


def write_report(
    summary: list[dict], out: Path, command: str, *, size: int, n: int, val_size: int, model: str = "tiny-arith"
) -> None:
    bed = "SmolLM2-135M-Instruct on the sums of benchmarks/smollm2_bed.py" if model == "smollm2" else model
    temperature = smollm2_bed.TEMPERATURE if model == "smollm2" else 1.0
    lines = [
        "# Selection quality",
        "",
        "Measured with:",
        "",
        "```bash",
        command,
        "```",
        "",
        (
            f"Each regime: {size}-problem pool, {val_size} clean validation problems, {bed}, k = {n} rollouts at "
            f"temperature {temperature} (transformers engine), select 25% of the pool. Mean +- std over seeds. A mode "
            "without `--target` in its name ranks with `--target mean` (the validation set's gradient, as the paper "
            "does)."
        ),
        "",
    ]
    titles = {
        "noisy": ("corrupted share (lower is better)", True),
        "imbalance": ("target-domain share", False),
        "low-utility": ("useful share", False),
        "wrong-answer": ("wrong-label share (lower is better)", True),
    }
    for regime in titles:
        rows = sorted(
            (r for r in summary if r["regime"] == regime),
            key=lambda r: (r["feature"] != "projected", r["feature"], r["mode"]),
        )
        if not rows:
            continue
        title, invert = titles[regime]
        lines += [
            f"## {regime}",
            "",
            f"| feature | mode | {title} | x base rate | AUROC | AUROC 95% interval |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            share = 1 - r["good_mean"] if invert else r["good_mean"]
            base = 1 - r["base_rate"] if invert else r["base_rate"]
            lines.append(
                f"| {r['feature']} | {r['mode']} | {share:.1%} +- {r['good_std']:.1%} | "
                f"{share / base:.2f} | {r['auroc_mean']:.3f} +- {r['auroc_std']:.3f} | "
                f"{r['auroc_ci95'][0]:.3f}-{r['auroc_ci95'][1]:.3f} |"
            )
        lines.append("")
    _plot(summary, out.with_suffix(".png"))
    lines += [f"![quality]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines))


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib  # a gradsel dependency (`gradsel report`)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = ("noisy", "imbalance", "low-utility")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, regime in zip(axes, regimes):
        rows = [r for r in summary if r["regime"] == regime and r["feature"] == "projected"]
        names = [r["mode"] for r in rows]
        vals = [1 - r["good_mean"] if regime == "noisy" else r["good_mean"] for r in rows]
        ax.bar(names, vals, yerr=[r["good_std"] for r in rows])
        ax.set_title(
            {
                "noisy": "noisy: corrupted share",
                "imbalance": "imbalance: target share",
                "low-utility": "low-utility: useful share",
            }[regime]
        )
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--n-val", type=int, default=None, help="rollouts per validation problem (default: --n)")
    ap.add_argument("--val-size", type=int, default=40, help="clean validation problems per regime")
    ap.add_argument("--sketch", type=parse_sketch, default=(16, 16), help="KOUTxKIN, as gradsel score --sketch")
    ap.add_argument("--regimes", nargs="+", default=["noisy", "imbalance", "low-utility"])
    ap.add_argument("--features", nargs="+", default=list(FEATURES))
    ap.add_argument("--out", type=Path, default=Path("docs/research/quality.md"))
    ap.add_argument(
        "--model",
        default="tiny-arith",
        help="checkpoint to score with (default the bundled model); `smollm2`: the real-model test bed",
    )
    ap.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep each regime's data and store under KEEP/REGIME-SEED, for offline analysis",
    )
    ap.add_argument(
        "--noise-fraction",
        type=float,
        default=0.5,
        help="noisy regime: the share of the pool judged by a coin flip (default 0.5)",
    )
    ap.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="measure nothing: merge the results.json files that --keep runs wrote (one seed each, "
        "say) and write the report from them",
    )
    ap.add_argument(
        "--wrong-keys",
        choices=("slip", "model"),
        default="slip",
        help="wrong-answer regime: synthetic slips (default), or the model's own commonest wrong answers",
    )
    args = ap.parse_args()
    console.set_verbosity(quiet=True)
    if args.summarize:
        results = [r for path in args.summarize for r in json.loads(path.read_text())]
        seeds = sorted({r["seed"] for r in results})
        command = (
            f".venv/bin/python -m benchmarks.quality{f' --model {args.model}' if args.model != 'tiny-arith' else ''}"
            f" --size {args.size} --val-size {args.val_size} --summarize {' '.join(map(str, args.summarize))}"
            f"  # seeds {' '.join(map(str, seeds))}"
        )
        write_report(
            summarize(results), args.out, command, size=args.size, n=args.n, val_size=args.val_size, model=args.model
        )
        return
    results = []
    if args.model == "smollm2":  # the bed's wrong keys are always the model's own
        wrong_key = smollm2_bed.model_wrong_key(smollm2_bed.model_path()) if "wrong-answer" in args.regimes else None
    else:
        wrong_key = model_wrong_key(args.model) if args.wrong_keys == "model" else None
    for regime in args.regimes:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                work = args.keep / f"{regime}-{seed}" if args.keep else Path(tmp)
                results += run_one(
                    work,
                    regime,
                    seed,
                    args.size,
                    args.n,
                    args.features,
                    args.val_size,
                    args.sketch,
                    args.n_val,
                    args.model,
                    wrong_key,
                    args.noise_fraction,
                )
            print(f"done {regime} seed {seed}", flush=True)
    summary = summarize(results)
    print(json.dumps(summary, indent=1))
    if args.keep:  # every candidate's score under every mode, for offline analysis
        (args.keep / "results.json").write_text(json.dumps(results))
    command = (
        f".venv/bin/python -m benchmarks.quality{f' --model {args.model}' if args.model != 'tiny-arith' else ''} --seeds {' '.join(map(str, args.seeds))} --size {args.size} "
        f"--n {args.n}{f' --n-val {args.n_val}' if args.n_val else ''} --val-size {args.val_size} --sketch {args.sketch[0]}x{args.sketch[1]} --regimes {' '.join(args.regimes)} --features {' '.join(args.features)}"
        f"{' --wrong-keys model' if args.wrong_keys == 'model' else ''}"
        f"{f' --noise-fraction {args.noise_fraction}' if args.noise_fraction != 0.5 else ''}"
    )
    write_report(summary, args.out, command, size=args.size, n=args.n, val_size=args.val_size, model=args.model)


if __name__ == "__main__":
    main()
