"""The shared-prompt pass selects what one sequence per rollout selects, on benchmarks/quality.py's
stores: for each regime, `gradsel demo-data`'s pool rolled out once (the transformers engine) and
scored twice on those rollouts, with and without `share_prompts`, then `select --ratio 0.25`
in every mode and every --target of the validation modes; prints, per regime, the modes whose
selections differ (none is the target) and the largest cosine difference over problems with a
gradient above float32 noise.

    .venv/bin/python -m benchmarks.same_selection [--seed 0] [--size 200] [--val-size 40] [--n 8] [--regimes noisy ...]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from gradsel.demo.tasks import write_regime
from gradsel.gradients.stage import ScoreConfig
from gradsel.pipeline.score import RolloutOptions, run_score
from gradsel.selection.modes import MODES
from gradsel.selection.modes import REGISTRY as MODE_RECORDS
from gradsel.selection.select import SelectConfig, select
from gradsel.store.directory import open_store


def compare(work: Path, regime: str, seed: int, size: int, val_size: int, n: int) -> dict:
    pool, val = write_regime(work / "data", regime, size=size, val_size=val_size, seed=seed)
    ro = RolloutOptions(n=n, engine="hf", max_tokens=8, seed=seed)
    sc = ScoreConfig(seed=seed, sketch=(16, 16))  # quality.py's projected feature, gradsel's defaults
    stores = {True: work / "shared", False: work / "plain"}
    scores = {True: run_score(stores[True], model="tiny-arith", pool=pool, val=val, ro=ro, sc=sc).scores.to_pylist()}
    # The same rollouts: a copy of the store without its features, scored again one sequence per rollout
    shutil.copytree(stores[True], stores[False])
    shutil.rmtree(stores[False] / open_store(stores[False]).read_manifest()["features"])
    scores[False] = run_score(
        stores[False], model="tiny-arith", pool=pool, val=val, ro=ro, sc=replace(sc, share_prompts=False)
    ).scores.to_pylist()
    sharing = [open_store(stores[s]).read_manifest()["prompt_sharing"]["used"] for s in (True, False)]
    assert sharing == [True, False], sharing  # the shared pass ran, not its fallback
    same_rollouts = {"problem_id", "reward_mean", "reward_std", "zero_advantage"}
    assert [{k: r[k] for k in same_rollouts} for r in scores[True]] == [
        {k: r[k] for k in same_rollouts} for r in scores[False]
    ]  # the same rollouts and rewards
    differ = []
    selectors = [(m, "auto") for m in MODES] + [
        (m, t) for m in MODES if MODE_RECORDS[m].honours_target for t in ("mean", "max", "subspace")
    ]
    for mode, target in selectors:
        cfg = SelectConfig(
            mode=mode,
            ratio=0.25,
            seed=seed,
            allow_fewer=True,
            target=target,
            band=(0.2, 0.8) if mode == "band" else (0.0, 1.0),
        )
        chosen = [select(open_store(stores[s]), cfg).problem_ids for s in (True, False)]
        if chosen[0] != chosen[1]:
            swapped = len(set(chosen[0]) ^ set(chosen[1])) // 2
            moved = sum(x != y for x, y in zip(chosen[0], chosen[1]))
            differ.append(
                f"{mode} --target {target}: "
                + (
                    f"{swapped} problems"
                    if swapped
                    else f"the same problems, {moved} of {len(chosen[0])} in another order"
                )
            )
    a = {r["problem_id"]: r for r in scores[True]}
    b = {r["problem_id"]: r for r in scores[False]}
    norms = np.array([b[p]["grad_norm"] or 0.0 for p in b])
    live = [p for p in b if (b[p]["grad_norm"] or 0.0) > 1e-5 * norms.max()]
    cos_diff = max(abs(a[p]["score_cos"] - b[p]["score_cos"]) for p in live)
    return {
        "regime": regime,
        "selectors": len(selectors),
        "differ": differ,
        "live": len(live),
        "max_cos_diff": cos_diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--val-size", type=int, default=40)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--regimes", nargs="+", default=["noisy", "imbalance", "low-utility"])
    args = ap.parse_args()
    for regime in args.regimes:
        work = Path(tempfile.mkdtemp(prefix=f"gradsel-same-{regime}-"))
        t = time.perf_counter()
        r = compare(work, regime, args.seed, args.size, args.val_size, args.n)
        shutil.rmtree(work)
        print(
            f"{regime} (seed {args.seed}, {args.size} + {args.val_size} problems, k={args.n}): {r['selectors']} selectors, "
            f"{'all the same' if not r['differ'] else 'differ: ' + '; '.join(r['differ'])}; "
            f"max |cos shared - plain| {r['max_cos_diff']:.2e} over {r['live']} problems with a gradient "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
