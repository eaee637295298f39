"""What the benchmarks know and no selector sees: which rows of a demo-data pool are bad, and
keys written by the scoring model itself. Evaluation instruments, kept out of the product."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from gradsel.demo.tasks import TRUTH_FILE, answer_of, prompt_text, wrong_answer


def model_wrong_key(model: str, samples: int = 32) -> Callable[[int, str, int, random.Random], int]:
    """A `wrong_key` for gradsel.demo.tasks.make_regime: the model's commonest wrong answer to a{op}b among
    `samples` completions at temperature 1 (seeded from the regime's rng); the synthetic slip
    where the model never errs."""
    import collections
    import re

    import torch

    from gradsel.inputs.models import load_causal_lm, load_tokenizer

    tok, lm = load_tokenizer(model), load_causal_lm(model).eval()

    def wrong_key(a: int, op: str, b: int, rng: random.Random) -> int:
        enc = tok([prompt_text(a, op, b)], return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(rng.randrange(2**31))
        with torch.no_grad():
            out = lm.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                max_new_tokens=8,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        wrong = collections.Counter(
            t.strip() for t in texts if re.fullmatch(r"-?\d+", t.strip()) and int(t) != answer_of(a, op, b)
        )
        return int(wrong.most_common(1)[0][0]) if wrong else wrong_answer(a, op, b, rng)

    return wrong_key


def regime_truth(data_dir: Path, regime: str) -> dict[str, bool]:
    """problem id -> True for the pool problems a selector should prefer, from what `write_regime`
    wrote into data_dir: clean (noisy), of the target domain (imbalance), useful (low-utility),
    correctly labelled (wrong-answer, from the side file). For benchmarks and oracles only."""
    from gradsel.inputs.problems import read_problems

    problems = read_problems(data_dir / "pool.parquet").problems
    if regime == "wrong-answer":
        wrong = set(json.loads((data_dir / TRUTH_FILE).read_text())["wrong_answer_ids"])
        return {p.problem_id: p.problem_id not in wrong for p in problems}
    wanted = {
        "clean": lambda e: True,
        "noisy": lambda e: not e["corrupted"],
        "imbalance": lambda e: bool(e["target"]),
        "low-utility": lambda e: not e["low_utility"],
    }[regime]
    return {p.problem_id: wanted(p.extra_info) for p in problems}
