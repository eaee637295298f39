"""A closed loop on the CPU: gradsel selects, TRL's GRPOTrainer trains, gradsel refreshes.

    .venv/bin/python examples/trl_loop.py --mode gradalign --rounds 3 --steps 10 --out runs/loop

Each round:
  1. `gradsel select` takes the round's subset from the store (verl Parquet);
  2. TRL's GRPOTrainer trains the current checkpoint on it for --steps steps, with gradsel's own
     reward function as the trainer's reward (so the noisy regime's coin-flip judge stays noisy);
  3. the checkpoint is saved, and `gradsel refresh` scores the next chunk with it.
Held-out accuracy (greedy, on clean problems the loop never trains on) is measured after each
round and written to OUT/results.json. Needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GRADSEL = [sys.executable, "-m", "gradsel.cli", "-q"]


def gradsel(*args: str) -> str:
    return subprocess.run([*GRADSEL, *args], check=True, capture_output=True, text=True).stdout


def reward_fn(completions, reward_model, extra_info, data_source, **_):
    """gradsel's registry reward for each completion, in TRL's reward-function signature."""
    from gradsel.problems import Problem
    from gradsel.rewards import resolve_reward

    out = []
    for i, (completion, rm, extra, source) in enumerate(zip(completions, reward_model, extra_info, data_source)):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        problem = Problem(str(extra["index"]), 0, "", rm["ground_truth"], data_source=source,
                          reward_style=rm["style"], extra_info=extra)
        # The sample index must differ between a prompt's generations for the coin-flip judge.
        out.append(resolve_reward(problem)(problem, text, reward_fn.calls * 1000 + i, 0))
    reward_fn.calls += 1
    return out


reward_fn.calls = 0


def train_round(model_dir: Path, data: Path, out_dir: Path, steps: int, seed: int) -> Path:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    dataset = load_dataset("parquet", data_files=str(data))["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GRPOConfig(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=64, num_generations=8,
        max_completion_length=8, max_steps=steps, learning_rate=1e-4, beta=0.0, temperature=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed, bf16=False,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_fn, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    ckpt = out_dir / "checkpoint"
    trainer.save_model(str(ckpt))
    tokenizer.save_pretrained(ckpt)
    return ckpt


def heldout_accuracy(model_dir: Path, n: int = 200, seed: int = 999) -> float:
    """Greedy accuracy on clean mixed problems from a seed the pool never uses."""
    import torch

    from gradsel.models import load_causal_lm, load_tokenizer
    from gradsel.tasks import make_regime

    rows, _ = make_regime("clean", size=n, val_size=1, seed=seed)
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    correct = 0
    for row in rows:
        ids = torch.tensor([tok(row["prompt"][0]["content"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        correct += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["reward_model"]["ground_truth"]
    return correct / n


def write_report(root: Path, doc: Path, command: str) -> None:
    """Table and plot of held-out accuracy per round for every mode run under `root`."""
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/results.json"))}
    rounds = max(len(r["rounds"]) for r in runs.values())
    lines = ["# Closed-loop results: gradsel + TRL GRPOTrainer on tiny-arith", "", "Reproduce with:", "",
             "```bash", command, "```", "",
             "Held-out accuracy (greedy, 200 clean mixed problems the loop never trains on) after each round. "
             "Round 0 is the bundled checkpoint.", "",
             "| mode | " + " | ".join(f"round {i}" for i in range(rounds)) + " |",
             "| --- | " + " | ".join("---:" for _ in range(rounds)) + " |"]
    for mode, r in runs.items():
        lines.append(f"| {mode} | " + " | ".join(f"{x['heldout_accuracy']:.3f}" for x in r["rounds"]) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, r in runs.items():
            ax.plot([x["round"] for x in r["rounds"]], [x["heldout_accuracy"] for x in r["rounds"]], marker="o", label=mode)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(doc.with_suffix(".png"), dpi=80)
        lines += ["", f"![results]({doc.with_suffix('.png').name})"]
    except ImportError:
        pass
    doc.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="gradalign")
    ap.add_argument("--regime", default="noisy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/loop"))
    ap.add_argument("--report", type=Path, help="write the table and plot of every run under --out to this file, then exit")
    args = ap.parse_args()
    if args.report:
        write_report(args.out, args.report, "for m in gradalign reliable random accgreedy; do\n"
                     "  .venv/bin/python examples/trl_loop.py --mode $m --rounds 3 --steps 10 --out runs/loop\n"
                     "done\n.venv/bin/python examples/trl_loop.py --out runs/loop --report docs/results.md")
        return

    out = args.out / args.mode
    store = out / "store"
    gradsel("demo-data", "--regime", args.regime, "--out", str(out / "data"), "--size", str(args.chunk_size * (args.rounds + 1)),
            "--seed", str(args.seed))
    from gradsel.models import resolve_model_path

    model = resolve_model_path("tiny-arith")
    gradsel("score", "--model", str(model), "--pool", str(out / "data/pool.parquet"), "--val", str(out / "data/val.parquet"),
            "--store", str(store), "--chunk-size", str(args.chunk_size), "--engine", "hf", "--max-tokens", "8",
            "--seed", str(args.seed))
    results = [{"round": 0, "heldout_accuracy": heldout_accuracy(model)}]
    print(json.dumps(results[-1]), flush=True)
    for r in range(args.rounds):
        subset = out / f"round{r}.parquet"
        gradsel("select", "--store", str(store), "--top-k", str(args.top_k), "--mode", args.mode, "--allow-fewer",
                "--format", "verl", "--out", str(subset), "--force", "--seed", str(args.seed))
        model = train_round(model, subset, out / f"round{r}", args.steps, args.seed)
        results.append({"round": r + 1, "heldout_accuracy": heldout_accuracy(model)})
        print(json.dumps(results[-1]), flush=True)
        if r + 1 < args.rounds:
            gradsel("refresh", "--store", str(store), "--model", str(model))
    (out / "results.json").write_text(json.dumps({"mode": args.mode, "rounds": results}, indent=2))


if __name__ == "__main__":
    main()
