"""`gradsel audit` against planted wrong keys: tiny-arith, the wrong-answer regime, the model's own keys.

    .venv/bin/python -m benchmarks.audit [--seeds 0] [--size 200] [--n 8] [--teach 0 20] [--teach-lr 1e-4]
        [--thresholds 0.6 0.5 0.65] [--keep DIR]

For each seed: the wrong-answer pool (40% of the rows keyed with the model's own commonest wrong
answer, tasks.model_wrong_key), `gradsel rollout` of the pool (transformers engine, k = --n, T = 1),
then the audit with each --teach step count. Prints, per seed and step count and per signal: AUROC
(wrong > right) with a bootstrap 95% interval, and at the default threshold the suspects listed,
precision, recall and the share of suspects whose proposed key is the true answer, at each
--thresholds value. `--keep DIR` keeps the data and stores (a rerun reuses them).
`--model smollm2`: the real-model test bed (benchmarks/smollm2_bed.py), rolled out at T = 1.0 with
at most 16 tokens, its taught copy supervised on `#### {answer}`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import smollm2_bed
from benchmarks.truth import model_wrong_key
from gradsel.demo.tasks import answer_of, parse_prompt, write_regime
from gradsel.review.audit import AuditConfig, audit_stages, store_checkpoint, store_stages, val_rows_from_store


def auroc(scores: np.ndarray, wrong: np.ndarray) -> float:
    pos, neg = scores[wrong], scores[~wrong]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def bootstrap(scores: np.ndarray, wrong: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = [
        auroc(scores[idx], wrong[idx]) for idx in (rng.integers(0, len(scores), len(scores)) for _ in range(reps))
    ]
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def measure(result, wrong_ids: set[str], truth: dict[str, str], thresholds: list[float]) -> dict:
    ev = result.evidence
    wrong = np.array([e.problem_id in wrong_ids for e in ev])
    out = {"problems": len(ev), "wrong": int(wrong.sum())}
    for name in ("rollout_signal", "taught_signal", "suspicion"):
        values = [getattr(e, name) for e in ev]
        if values[0] is None:
            continue
        s = np.array(values, dtype=float)
        out[name] = {"auroc": round(auroc(s, wrong), 3), "ci95": [round(x, 3) for x in bootstrap(s, wrong)]}
    out["at"] = {}
    for threshold in thresholds:
        suspects = [e for e in ev if e.suspicion >= threshold and e.suspicion > 0]
        hits = sum(e.problem_id in wrong_ids for e in suspects)
        out["at"][threshold] = {
            "listed": len(suspects),
            "precision": round(hits / len(suspects), 3) if suspects else None,
            "recall": round(hits / wrong.sum(), 3) if wrong.sum() else None,
            "proposed_true": round(sum(e.proposed_key == truth[e.problem_id] for e in suspects) / len(suspects), 3)
            if suspects
            else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--val-size", type=int, default=40)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--teach", type=int, nargs="+", default=[0, 20], help="--teach-steps values to measure")
    ap.add_argument("--teach-lr", type=float, default=1e-4)
    ap.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[AuditConfig().threshold, 0.5, 0.65],
        help="suspicion thresholds to report precision, recall and proposals at (the first: the default)",
    )
    ap.add_argument("--model", default="tiny-arith")
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    bed = args.model == "smollm2"
    model = str(smollm2_bed.model_path()) if bed else args.model
    wrong_key = smollm2_bed.model_wrong_key(model) if bed else model_wrong_key(model)
    writer = smollm2_bed.write_regime if bed else write_regime
    sampling = (
        ["--max-tokens", str(smollm2_bed.MAX_TOKENS), "--temperature", str(smollm2_bed.TEMPERATURE)]
        if bed
        else ["--max-tokens", "8"]
    )
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.keep / f"seed-{seed}" if args.keep else Path(tmp)
            data, store = work / "data", work / "store"
            if not (data / "pool.truth.json").is_file():
                writer(data, "wrong-answer", size=args.size, val_size=args.val_size, seed=seed, wrong_key=wrong_key)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gradsel.cli",
                    "-q",
                    "rollout",
                    "-m",
                    model,
                    "-p",
                    str(data / "pool.parquet"),
                    "-s",
                    str(store),
                    "--n",
                    str(args.n),
                    "--engine",
                    "hf",
                    *sampling,
                    "--seed",
                    str(seed),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            wrong_ids = set(json.loads((data / "pool.truth.json").read_text())["wrong_answer_ids"])
            stages, manifest = store_stages(store)
            truth = {
                pid: smollm2_bed.true_answer(p.messages())
                if bed
                else str(answer_of(*parse_prompt(p.messages()[-1]["content"])))
                for pid, p in stages[-1].problems.items()
            }
            model_path = store_checkpoint(store, manifest)
            for steps in args.teach:
                cfg = AuditConfig(
                    threshold=args.thresholds[0],
                    teach_steps=steps,
                    teach_lr=args.teach_lr,
                    seed=seed,
                    teach_template=smollm2_bed.TEACH_TEMPLATE if bed else "{answer}",
                )
                val = val_rows_from_store(store, manifest, model_path, data / "val.parquet") if steps else None
                result = audit_stages(stages, cfg, model_path=model_path, val=val)
                print(
                    json.dumps(
                        {
                            "seed": seed,
                            "teach_steps": steps,
                            "teach_lr": args.teach_lr,
                            **measure(result, wrong_ids, truth, args.thresholds),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
