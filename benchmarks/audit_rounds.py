"""`gradsel audit` across `refresh` rounds with TRL's GRPOTrainer in the loop (issue 30 item 4).

    .venv/bin/python -m benchmarks.audit_rounds --seeds 0 1 2 --size 120 --rounds 3 --steps 10 \\
        --top-k 30 --arms random whole fix --out runs/audit_rounds

Per seed: the wrong-answer pool (40% of the rows keyed with tiny-arith's own commonest wrong
answer, tasks.model_wrong_key), `gradsel score --chunk-size SIZE` (one chunk: the whole pool),
then round after round, as examples/trl_loop.py does:
  1. `audit` on the store (every round so far): per signal AUROC (wrong > right) with a bootstrap
     95% interval over the round's chunk, and at the default threshold the suspects listed,
     precision, recall and the share whose proposed key is the true answer; the history signal's
     weight in the suspicion is varied (the audit's own weight is audit.HISTORY_WEIGHT);
  2. the share of wrong keys in `select --top-k K` (the default), in `select --mode random`, and in
     the default's ranking with the audit's suspects sunk below every other problem;
  3. TRL's GRPOTrainer trains the default selection for --steps steps (examples/trl_loop.py's
     train_round and reward: a wrong key stays wrong); held-out accuracy (trl_loop's heldout_accuracy);
  4. `gradsel refresh --reuse-unselected` on the new checkpoint: the problems not selected yet are
     rolled out and scored again, so each has one more round of history.
--arms adds the closed loop's other arms, trained the same rounds and steps from the same
checkpoint: `random` (select --mode random each round, its own store refreshed the same way),
`whole` (the whole pool each round) and `fix` (the whole pool after `gradsel audit --fix` on the
round-0 store). One JSON line per (seed, round) and per arm's round; results in OUT/seedS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.audit import auroc, bootstrap
from benchmarks.truth import model_wrong_key
from gradsel.demo.tasks import answer_of, parse_prompt, write_regime
from gradsel.review.audit import AuditConfig, audit_stages, store_stages, suspicion

ROOT = Path(__file__).resolve().parents[1]

GRADSEL = [sys.executable, "-m", "gradsel.cli", "-q"]
HISTORY_WEIGHTS = (0.0, 0.25, 0.5, 1.0)


def _trl_loop():
    spec = importlib.util.spec_from_file_location("trl_loop", ROOT / "examples" / "trl_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gradsel(*args: str) -> str:
    return subprocess.run([*GRADSEL, *args], check=True, capture_output=True, text=True).stdout


def select_ids(store: Path, out: Path, *args: str) -> list[str]:
    gradsel("select", "--store", str(store), "--format", "ids", "--out", str(out), "--force", *args)
    return [line for line in out.read_text().split() if line]


def audit_figures(store: Path, chunk: list[str], wrong_ids: set[str], truth: dict[str, str], threshold: float) -> dict:
    """The audit's figures over the round's chunk; `suspects`: the ids it lists at `threshold`."""
    stages, _ = store_stages(store)
    ev = [e for e in audit_stages(stages, AuditConfig(threshold=threshold)).evidence if e.problem_id in set(chunk)]
    wrong = np.array([e.problem_id in wrong_ids for e in ev])
    out: dict = {
        "problems": len(ev),
        "wrong": int(wrong.sum()),
        "with_history": int(sum(e.history_signal is not None for e in ev)),
    }

    def score(name: str, values) -> None:
        s = np.array(values, dtype=float)
        out[name] = {"auroc": round(auroc(s, wrong), 3), "ci95": [round(x, 3) for x in bootstrap(s, wrong)]}

    score("rollout_signal", [e.rollout_signal for e in ev])
    # Missing history ranks as neutral (0) for the signals alone.
    score("history_signal", [e.history_signal if e.history_signal is not None else 0.0 for e in ev])
    score("key_trend", [-(e.key_share_trend or 0.0) for e in ev])
    # The old rule, for the record: history averaged in as one more signal, 0 when flat or paid.
    old = [
        min(1.0, (e.rollout_signal + max(0.0, e.history_signal or 0.0)) / 2) if e.rounds > 1 else e.rollout_signal
        for e in ev
    ]
    score("suspicion_old_rule", old)
    at = {}
    for w in HISTORY_WEIGHTS:
        s = [suspicion(e, w) for e in ev]
        score(f"suspicion_w{w}", s)
        listed = [e for e, v in zip(ev, s) if v >= threshold and v > 0]
        hits = sum(e.problem_id in wrong_ids for e in listed)
        at[w] = {
            "listed": len(listed),
            "precision": round(hits / len(listed), 3) if listed else None,
            "recall": round(hits / wrong.sum(), 3) if wrong.sum() else None,
            "proposed_true": round(sum(e.proposed_key == truth[e.problem_id] for e in listed) / len(listed), 3)
            if listed
            else None,
        }
    listed = [e for e, v in zip(ev, old) if v >= threshold and v > 0]
    at["old_rule"] = {
        "listed": len(listed),
        "precision": round(sum(e.problem_id in wrong_ids for e in listed) / len(listed), 3) if listed else None,
    }
    out["at_threshold"] = at
    out["suspects"] = sorted(e.problem_id for e in ev if e.suspect)
    return out


def wrong_share(ids: list[str], wrong_ids: set[str]) -> float | None:
    return round(sum(i in wrong_ids for i in ids) / len(ids), 3) if ids else None


def run_seed(seed: int, args, loop) -> None:
    work = args.out / f"seed{seed}"
    data = work / "data"
    model0 = str(loop_model())
    if not (data / "pool.truth.json").is_file():
        write_regime(
            data, "wrong-answer", size=args.size, val_size=args.val_size, seed=seed, wrong_key=model_wrong_key(model0)
        )
    wrong_ids = set(json.loads((data / "pool.truth.json").read_text())["wrong_answer_ids"])
    from gradsel.inputs.problems import read_problems

    problems = read_problems(data / "pool.parquet").problems
    truth = {p.problem_id: str(answer_of(*parse_prompt(p.messages()[-1]["content"]))) for p in problems}
    store0 = work / "store0"
    if not (work / "store0.done").is_file():
        shutil.rmtree(store0, ignore_errors=True)
        gradsel(
            "score",
            "--model",
            model0,
            "--pool",
            str(data / "pool.parquet"),
            "--val",
            str(data / "val.parquet"),
            "--store",
            str(store0),
            "--chunk-size",
            str(args.size),
            "--engine",
            "hf",
            "--max-tokens",
            "8",
            "--n",
            str(args.n),
            "--seed",
            str(seed),
        )
        (work / "store0.done").write_text("")
    base_acc = loop.heldout_accuracy(model0)
    for arm in ["default", *args.arms]:
        results = work / f"{arm}.json"
        if results.is_file():
            continue
        rows = run_arm(arm, work, data, store0, seed, wrong_ids, truth, base_acc, args, loop)
        results.write_text(json.dumps(rows, indent=1))


def loop_model() -> Path:
    from gradsel.inputs.models import resolve_model_path

    return resolve_model_path("tiny-arith")


def run_arm(arm, work, data, store0, seed, wrong_ids, truth, base_acc, args, loop) -> list[dict]:
    out = work / arm
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = out / "store"
    shutil.copytree(store0, store)
    model = loop_model()
    rows = [{"seed": seed, "arm": arm, "round": 0, "heldout": base_acc}]
    train_pool = data / "pool.parquet"
    if arm == "fix":
        train_pool = out / "pool.fixed.parquet"
        gradsel("audit", "--store", str(store), "--fix", str(train_pool), "--force")
        changes = [json.loads(line) for line in (out / "pool.fixed.parquet.changes.jsonl").read_text().splitlines()]
        rows[0]["fix"] = {
            "changed": len(changes),
            "changed_wrong": sum(c["problem_id"] in wrong_ids for c in changes),
            "changed_to_true": sum(c["new_key"] == truth[c["problem_id"]] for c in changes),
        }
    for r in range(args.rounds):
        row: dict = {"seed": seed, "arm": arm, "round": r}
        subset = out / f"round{r}.parquet"
        if arm in ("default", "random"):
            manifest = json.loads((store / "manifest.json").read_text())
            chunk = manifest["rounds"][-1]["chunk_ids"]
            row["chunk"] = len(chunk)
            if arm == "default":
                row["audit"] = audit_figures(store, chunk, wrong_ids, truth, AuditConfig().threshold)
                suspects = set(row["audit"].pop("suspects"))
                ranked = select_ids(store, out / "ranked.txt", "--all")
                sunk = [i for i in ranked if i not in suspects] + [i for i in ranked if i in suspects]
                rand = select_ids(
                    store,
                    out / "random.txt",
                    "--top-k",
                    str(args.top_k),
                    "--allow-fewer",
                    "--mode",
                    "random",
                    "--seed",
                    str(seed),
                )
                row["selection_wrong_share"] = {
                    "chunk": wrong_share(chunk, wrong_ids),
                    "eligible": wrong_share(ranked, wrong_ids),
                    "random": wrong_share(rand, wrong_ids),
                    "default": wrong_share(ranked[: args.top_k], wrong_ids),
                    "default_suspects_sunk": wrong_share(sunk[: args.top_k], wrong_ids),
                }
                print(json.dumps(row), flush=True)
            mode = [] if arm == "default" else ["--mode", "random", "--seed", str(seed)]
            # The last select records the round's selection (what refresh leaves out next round).
            gradsel(
                "select",
                "--store",
                str(store),
                "--format",
                "verl",
                "--out",
                str(subset),
                "--force",
                "--top-k",
                str(args.top_k),
                "--allow-fewer",
                *mode,
            )
        else:
            shutil.copyfile(train_pool, subset)
        import pyarrow.parquet as pq

        row["trained_on"] = pq.read_metadata(subset).num_rows
        model = loop.train_round(model, subset, out / f"round{r}", args, seed)
        row["heldout"] = loop.heldout_accuracy(model)
        shutil.rmtree(out / f"round{r - 1}" / "checkpoint", ignore_errors=True)
        if arm in ("default", "random") and r + 1 < args.rounds:
            gradsel("refresh", "--store", str(store), "--model", str(model), "--reuse-unselected")
        print(json.dumps({k: v for k, v in row.items() if k != "audit"} | {"arm": arm}), flush=True)
        rows.append(row)
    shutil.rmtree(store, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--size", type=int, default=120)
    ap.add_argument("--val-size", type=int, default=40)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="GRPO steps per round (8 prompts x 8 completions each)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=30)
    ap.add_argument("--arms", nargs="*", default=[], choices=["random", "whole", "fix"])
    ap.add_argument("--out", type=Path, default=Path("runs/audit_rounds"))
    args = ap.parse_args()
    loop = _trl_loop()
    for seed in args.seeds:
        run_seed(seed, args, loop)


if __name__ == "__main__":
    main()
