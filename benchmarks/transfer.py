"""Does learning some problems move others? Transfer on a checkpoint, measured by fine-tuning.

    .venv/bin/python -m benchmarks.transfer [--model tiny-arith] [--domain sub2] [--seeds 0 1]
        [--size 200] [--steps 100] [--lr 1e-4]

A gradient selector can only rank problem p above q if training on p moves the model on the
problems it is meant to help. This measures that directly. Operand pairs of one domain are split
at random into two disjoint sets A and B (and C is another domain, for generic interference).
The model is fine-tuned (supervised: cross-entropy on the answer tokens and EOS, AdamW, batch
32 drawn from A) and greedy accuracy on A, B and C is measured before and after. Two arms:

  correct  A with its true answers: does B improve with A (transfer)?
  wrong    A with plausible wrong answers (`gradsel.demo.tasks.wrong_answer`): does harm transfer to B?

Prints a Markdown table of the accuracy changes, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from gradsel.demo.tasks import DOMAINS, answer_of, prompt_text, wrong_answer
from gradsel.inputs.models import load_causal_lm, load_tokenizer


def split_pairs(domain: str, size: int, seed: int) -> tuple[list, list]:
    """Two disjoint random sets of operand pairs of one domain (a random, not rule-based, split)."""
    rng = random.Random(f"transfer/{domain}/{seed}")
    dom = DOMAINS[domain]
    pairs: list[tuple[int, int]] = []
    seen = set()
    while len(pairs) < 2 * size:
        pair = dom.sample(rng)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs[:size], pairs[size:]


@torch.no_grad()
def greedy_accuracy(model, tok, op: str, pairs) -> float:
    model.eval()
    prompts = [prompt_text(a, op, b) for a, b in pairs]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(t.strip() == str(answer_of(a, op, b)) for t, (a, b) in zip(texts, pairs)) / len(pairs)


def fine_tune(model, tok, examples: list[tuple[str, str]], *, steps: int, lr: float, seed: int) -> None:
    """Supervised steps on (prompt, answer) pairs: the loss covers answer tokens and EOS only."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = [rng.choice(examples) for _ in range(32)]
        seqs, labels = [], []
        for prompt, answer in batch:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def run(model_name: str, domain: str, other: str, seed: int, size: int, steps: int, lr: float) -> list[dict]:
    tok = load_tokenizer(model_name)
    op, other_op = DOMAINS[domain].op, DOMAINS[other].op
    a_pairs, b_pairs = split_pairs(domain, size, seed)
    c_pairs, _ = split_pairs(other, size, seed)
    rng = random.Random(f"transfer/labels/{seed}")
    labels = {
        "correct": [str(answer_of(a, op, b)) for a, b in a_pairs],
        "wrong": [str(wrong_answer(a, op, b, rng)) for a, b in a_pairs],
    }
    rows = []
    for arm, answers in labels.items():
        model = load_causal_lm(model_name)
        before = {
            s: greedy_accuracy(model, tok, o, p)
            for s, o, p in (("A", op, a_pairs), ("B", op, b_pairs), ("C", other_op, c_pairs))
        }
        fine_tune(
            model,
            tok,
            [(prompt_text(a, op, b), y) for (a, b), y in zip(a_pairs, answers)],
            steps=steps,
            lr=lr,
            seed=seed,
        )
        after = {
            s: greedy_accuracy(model, tok, o, p)
            for s, o, p in (("A", op, a_pairs), ("B", op, b_pairs), ("C", other_op, c_pairs))
        }
        rows.append(
            {
                "arm": arm,
                "seed": seed,
                **{f"{s}_before": before[s] for s in before},
                **{f"{s}_after": after[s] for s in after},
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-arith")
    ap.add_argument("--domain", default="sub2")
    ap.add_argument("--other", default="mul", help="another domain, for generic interference")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--size", type=int, default=200, help="problems in A and in B")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [
        r for seed in args.seeds for r in run(args.model, args.domain, args.other, seed, args.size, args.steps, args.lr)
    ]
    print(
        f"model {args.model}, domain {args.domain} (C: {args.other}), |A| = |B| = {args.size}, "
        f"{args.steps} steps of 32 at lr {args.lr}, seeds {args.seeds}; greedy accuracy\n"
    )
    print("| labels of A | A before -> after | B before -> after (transfer) | C before -> after (other domain) |")
    print("| --- | --- | --- | --- |")
    for arm in ("correct", "wrong"):
        rs = [r for r in rows if r["arm"] == arm]

        def cell(s: str) -> str:
            b = statistics.mean(r[f"{s}_before"] for r in rs)
            a = statistics.mean(r[f"{s}_after"] for r in rs)
            d = [r[f"{s}_after"] - r[f"{s}_before"] for r in rs]
            spread = statistics.pstdev(d) if len(d) > 1 else 0.0
            return f"{b:.3f} -> {a:.3f} ({a - b:+.3f} +- {spread:.3f})"

        print(f"| {arm} | {cell('A')} | {cell('B')} | {cell('C')} |")


if __name__ == "__main__":
    main()
