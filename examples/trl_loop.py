"""A closed loop on the CPU: gradsel selects, TRL's GRPOTrainer trains, gradsel refreshes.

    .venv/bin/python examples/trl_loop.py --regimes wrong-answer --arms oracle random default gradalign whole \\
        --seeds 0 1 2 --rounds 3 --out runs/loop
    .venv/bin/python examples/trl_loop.py --out runs/loop --report docs/research/results.md

For each regime and seed, `gradsel demo-data` writes a pool of rounds x chunk-size problems, and
`gradsel score` scores its first chunk with the bundled checkpoint, once, for every arm. Then
each arm, round after round:
  1. takes the round's subset of the scored chunk (an arm is a way to choose it, below);
  2. TRL's GRPOTrainer trains the arm's current checkpoint on it, with gradsel's own reward
     function as the trainer's reward (the noisy regime's coin-flip judge stays a coin flip, and
     a wrong reference answer stays wrong);
  3. the checkpoint is saved, held-out accuracy is measured, and `gradsel refresh` scores the
     next chunk with the new checkpoint.
Arms: `whole` (every problem of the chunk), `oracle` (only clean, useful problems with a GRPO
signal, read from the regime's ground truth, which no selector sees), `unwanted` (only the others:
corrupted, trivial or wrongly labelled), and any `gradsel select`
mode: `default` (no --mode: what a user gets), `gradalign` (the paper's method, --target mean),
`random`, `accgreedy`, ... Held-out accuracy is measured on clean mixed problems from a seed the
pool never uses, sampled at temperature 1.0 (what GRPO optimises) and greedy. Results go to OUT/REGIME/seedS/ARM/results.json. Needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

# The evaluation's truth (which keys are wrong) comes from the repository's benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRADSEL = [sys.executable, "-m", "gradsel.cli", "-q"]
SELECT_ARGS = {"default": [], "gradalign": ["--mode", "gradalign", "--target", "mean"]}
REGIMES = ("noisy", "wrong-answer", "low-utility")


def gradsel(*args: str) -> str:
    return subprocess.run([*GRADSEL, *args], check=True, capture_output=True, text=True).stdout


def reward_fn(completions, reward_model, extra_info, data_source, **_):
    """gradsel's registry reward for each completion, in TRL's reward-function signature."""
    from gradsel.inputs.problems import Problem
    from gradsel.rewards.registry import resolve_reward

    out = []
    for i, (completion, rm, extra, source) in enumerate(zip(completions, reward_model, extra_info, data_source)):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        problem = Problem(
            str(extra["index"]),
            0,
            "",
            rm["ground_truth"],
            data_source=source,
            reward_style=rm["style"],
            extra_info=extra,
        )
        # The sample index must differ between a prompt's generations for the coin-flip judge.
        out.append(resolve_reward(problem)(problem, text, reward_fn.calls * 1000 + i, 0))
    reward_fn.calls += 1
    return out


reward_fn.calls = 0


def train_round(model_dir: Path, data: Path, out_dir: Path, args, seed: int) -> Path:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    dataset = load_dataset("parquet", data_files=str(data))["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=8,
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=args.beta,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",  # each round is a new trainer: a decay would restart every round
    )
    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=reward_fn, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    ckpt = out_dir / "checkpoint"
    trainer.save_model(str(ckpt))
    tokenizer.save_pretrained(ckpt)
    return ckpt


def heldout_accuracy(model_dir: Path, n: int = 1000, samples: int = 4, seed: int = 999) -> dict[str, float]:
    """Accuracy on n clean mixed problems from a seed the pool never uses: `sampled`, the mean over
    `samples` completions at temperature 1.0 (what GRPO optimises), and `greedy`."""
    import torch

    from gradsel.demo.tasks import make_regime
    from gradsel.inputs.models import load_causal_lm, load_tokenizer

    rows, _ = make_regime("clean", size=n, val_size=1, seed=seed)
    answers = [r["reward_model"]["ground_truth"] for r in rows]
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    tok.padding_side = "left"
    enc = tok([r["prompt"][0]["content"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    for name, sampling in (
        ("greedy", {"do_sample": False}),
        ("sampled", {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_return_sequences": samples}),
    ):
        torch.manual_seed(seed)
        with torch.no_grad():
            generated = model.generate(
                **enc, **sampling, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
        texts = tok.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        per = len(texts) // n
        out[name] = sum(t.strip() == answers[i // per] for i, t in enumerate(texts)) / len(texts)
    return out


def choose(arm: str, store: Path, data_dir: Path, regime: str, out: Path, top_k: int, seed: int) -> int:
    """Write the round's subset as verl Parquet; return its size."""
    import pyarrow.parquet as pq

    from benchmarks.truth import regime_truth
    from gradsel.inputs.problems import problem_from_row

    common = ["select", "--store", str(store), "--format", "verl", "--out", str(out), "--force", "--seed", str(seed)]
    if arm == "whole":
        gradsel(*common, "--all", "--include-zero-advantage", "--mode", "random")
    elif arm in ("oracle", "unwanted"):
        # Only the wanted (oracle) or only the unwanted problems with a GRPO signal, in a seeded
        # random order: the bounds any selector lies between.
        gradsel(*common, "--all", "--mode", "random")
        table = pq.read_table(out)
        truth = regime_truth(data_dir, regime)
        keep = [
            i
            for i, row in enumerate(table.to_pylist())
            if truth[problem_from_row(row, i).problem_id] == (arm == "oracle")
        ][:top_k]
        pq.write_table(table.take(keep), out)
    else:
        gradsel(*common, "--top-k", str(top_k), "--allow-fewer", *SELECT_ARGS.get(arm, ["--mode", arm]))
    return pq.read_metadata(out).num_rows


def run_arm(arm: str, base: Path, regime: str, seed: int, args) -> None:
    from gradsel.inputs.models import resolve_model_path

    out = base / arm
    if (out / "results.json").is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    store = out / "store"
    shutil.copytree(base / "store0", store)
    model = resolve_model_path("tiny-arith")
    results = [{"round": 0, **json.loads((base / "round0.json").read_text())}]
    for r in range(args.rounds):
        subset = out / f"round{r}.parquet"
        size = choose(arm, store, base / "data", regime, subset, args.top_k, seed)
        model = train_round(model, subset, out / f"round{r}", args, seed)
        results.append({"round": r + 1, "trained_on": size, **heldout_accuracy(model)})
        print(json.dumps({"regime": regime, "seed": seed, "arm": arm, **results[-1]}), flush=True)
        if r + 1 < args.rounds:
            gradsel("refresh", "--store", str(store), "--model", str(model))
        shutil.rmtree(out / f"round{r - 1}" / "checkpoint", ignore_errors=True)  # keep the disk small
    (out / "results.json").write_text(
        json.dumps(
            {"regime": regime, "seed": seed, "arm": arm, "rounds": results, "settings": settings(args)}, indent=2
        )
    )


def settings(args) -> dict:
    return {k: getattr(args, k) for k in ("rounds", "steps", "lr", "beta", "chunk_size", "top_k")} | {
        "command": " ".join([".venv/bin/python", "examples/trl_loop.py", *sys.argv[1:]])
    }


def prepare(base: Path, regime: str, seed: int, args) -> None:
    """Data, the round-0 store and round-0 accuracy: shared by every arm of (regime, seed)."""
    from gradsel.inputs.models import resolve_model_path

    if (base / "round0.json").is_file():
        return
    model = resolve_model_path("tiny-arith")
    if regime == "wrong-answer" and args.wrong_keys == "model":  # not a demo-data option: written here
        from benchmarks.truth import model_wrong_key
        from gradsel.demo.tasks import write_regime

        write_regime(
            base / "data", regime, size=args.chunk_size * args.rounds, seed=seed, wrong_key=model_wrong_key(str(model))
        )
    else:
        gradsel(
            "demo-data",
            "--regime",
            regime,
            "--out",
            str(base / "data"),
            "--size",
            str(args.chunk_size * args.rounds),
            "--seed",
            str(seed),
        )
    shutil.rmtree(base / "store0", ignore_errors=True)
    gradsel(
        "score",
        "--model",
        str(model),
        "--pool",
        str(base / "data/pool.parquet"),
        "--val",
        str(base / "data/val.parquet"),
        "--store",
        str(base / "store0"),
        "--chunk-size",
        str(args.chunk_size),
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        "--seed",
        str(seed),
    )
    (base / "round0.json").write_text(json.dumps(heldout_accuracy(model)))


def write_report(root: Path, doc: Path, command: str) -> None:
    """Per regime and arm: sampled held-out accuracy per round (mean +- std over seeds), its gain
    over round 0, the share of the oracle's gain over random that the arm captures, and the final
    greedy accuracy; plus a plot."""
    runs = [json.loads(p.read_text()) for p in sorted(root.glob("*/seed*/*/results.json"))]
    commands = sorted({r["settings"]["command"] for r in runs}) + [command]
    lines = [
        "# Closed-loop results: gradsel + TRL GRPOTrainer on tiny-arith",
        "",
        "Reproduce with:",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    if runs:
        s = runs[0]["settings"]
        lines += [
            f"{s['rounds']} rounds; each round trains on up to {s['top_k']} problems chosen from a fresh "
            f"{s['chunk_size']}-problem chunk, {s['steps']} GRPO steps of 8 prompts x 8 completions, "
            f"constant learning rate {s['lr']}, KL {s['beta']}. Held-out accuracy on 1,000 clean mixed problems "
            "the loop never trains on: *sampled* is the mean over 4 completions at temperature 1.0 (what GRPO "
            "optimises), *greedy* the greedy answer. Round 0 is the bundled checkpoint. Mean +- std over seeds.",
            "",
        ]
    mean = statistics.mean
    for regime in REGIMES:
        by_arm: dict[str, list[dict]] = {}
        for r in runs:
            if r["regime"] == regime:
                by_arm.setdefault(r["arm"], []).append(r)
        if not by_arm:
            continue
        final = {arm: mean(r["rounds"][-1]["sampled"] for r in rs) for arm, rs in by_arm.items()}
        start = mean(r["rounds"][0]["sampled"] for rs in by_arm.values() for r in rs)
        rounds = max(len(r["rounds"]) for rs in by_arm.values() for r in rs)
        lines += [
            f"## {regime}",
            "",
            "| arm | seeds | "
            + " | ".join(f"sampled, round {i}" for i in range(rounds))
            + " | gain over round 0 | share of oracle's gain over random | greedy, last round |",
            "| --- | ---: | " + " | ".join("---:" for _ in range(rounds)) + " | ---: | ---: | ---: |",
        ]
        ref = (final["random"], final["oracle"]) if {"random", "oracle"} <= set(final) else None
        for arm, rs in sorted(by_arm.items(), key=lambda kv: -final[kv[0]]):
            cells = []
            for i in range(rounds):
                vals = [r["rounds"][i]["sampled"] for r in rs if i < len(r["rounds"])]
                cells.append(f"{mean(vals):.3f}" + (f" +- {statistics.pstdev(vals):.3f}" if len(vals) > 1 else ""))
            share = f"{(final[arm] - ref[0]) / (ref[1] - ref[0]):.0%}" if ref and ref[1] != ref[0] else "-"
            greedy = mean(r["rounds"][-1]["greedy"] for r in rs)
            lines.append(
                f"| {arm} | {len(rs)} | "
                + " | ".join(cells)
                + f" | {final[arm] - start:+.3f} | {share} | {greedy:.3f} |"
            )
        lines.append("")
    if _plot(runs, doc.with_suffix(".png")):
        lines += [f"![results]({doc.with_suffix('.png').name})", ""]
    doc.write_text("\n".join(lines))


def _plot(runs: list[dict], path: Path) -> bool:
    import matplotlib  # a gradsel dependency (`gradsel report`)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [g for g in REGIMES if any(r["regime"] == g for r in runs)]
    fig, axes = plt.subplots(1, max(len(regimes), 1), figsize=(5 * max(len(regimes), 1), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        arms = sorted({r["arm"] for r in runs if r["regime"] == regime})
        for arm in arms:
            rs = [r for r in runs if r["regime"] == regime and r["arm"] == arm]
            n = min(len(r["rounds"]) for r in rs)
            ax.plot(
                range(n),
                [statistics.mean(r["rounds"][i]["sampled"] for r in rs) for i in range(n)],
                marker="o",
                label=arm,
            )
        ax.set_title(regime)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy, sampled at T=1")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=["noisy"], choices=REGIMES)
    ap.add_argument("--arms", nargs="+", default=["default", "oracle", "random"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps per round")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient")
    ap.add_argument("--chunk-size", type=int, default=200, help="new problems scored per round")
    ap.add_argument("--top-k", type=int, default=50, help="problems trained on per round")
    ap.add_argument(
        "--wrong-keys",
        choices=("slip", "model"),
        default="slip",
        help="wrong-answer regime: synthetic slips, or the bundled model's own commonest wrong answers",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/loop"))
    ap.add_argument(
        "--report", type=Path, help="write the tables and plot of every run under --out to this file, then exit"
    )
    args = ap.parse_args()
    if args.report:
        write_report(args.out, args.report, " ".join([".venv/bin/python", "examples/trl_loop.py", *sys.argv[1:]]))
        return
    for regime in args.regimes:
        for seed in args.seeds:
            base = args.out / regime / f"seed{seed}"
            prepare(base, regime, seed, args)
            for arm in args.arms:
                run_arm(arm, base, regime, seed, args)


if __name__ == "__main__":
    main()
