"""Capability spread of a model on the default mixed arithmetic pool.

    .venv/bin/python -m benchmarks.capability [--model tiny-arith] [--size 400] [--n 8] [--engine hf]

Prints, per domain, the mean pass rate at temperature 1.0 and the share of problems whose pass
rate is strictly between 0 and 1 (the problems with a non-zero GRPO advantage), as Markdown.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from gradsel.demo.tasks import make_regime
from gradsel.inputs.models import resolve_model_path
from gradsel.inputs.problems import problem_from_row
from gradsel.rollout.stage import SamplingConfig, make_engine, pass_rates, rollout_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-arith")
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    args = ap.parse_args()

    rows, _ = make_regime("clean", size=args.size, seed=args.seed)
    problems = [problem_from_row(r, i) for i, r in enumerate(rows)]
    engine = make_engine(args.engine, resolve_model_path(args.model))
    cfg = SamplingConfig(n=args.n, temperature=1.0, max_tokens=8, seed=args.seed)
    rollouts = [r for batch in rollout_batches(problems, engine, cfg) for r in batch]
    rates = pass_rates([r.problem_id for r in rollouts], [r.reward for r in rollouts])
    by_domain: dict[str, list[float]] = defaultdict(list)
    for p in problems:
        by_domain[p.data_source].append(rates[p.problem_id])
    all_rates = list(rates.values())
    print(f"model {args.model}, engine {args.engine}, {args.size} problems, k={args.n}, T=1.0, seed {args.seed}\n")
    print("| domain | problems | mean pass rate | 0 < pass < 1 |")
    print("| --- | ---: | ---: | ---: |")
    for name in sorted(by_domain) + ["all"]:
        vals = all_rates if name == "all" else by_domain[name]
        mixed = sum(0 < v < 1 for v in vals) / len(vals)
        print(f"| {name} | {len(vals)} | {sum(vals) / len(vals):.3f} | {mixed:.1%} |")


if __name__ == "__main__":
    main()
