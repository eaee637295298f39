"""The real-model test bed: SmolLM2-135M-Instruct on small sums, in the regimes of gradsel/demo/tasks.py.

SmolLM2-135M-Instruct (scripts/smollm2.py) cannot add two-digit numbers (pass rate 0.01-0.04, and
0-0.5 on a two-digit number plus a digit), so the bed adds two single digits (DOMAINS), sampled at
T = 1.0 (at 0.7 it is right 75-90% of the time: few problems would have a GRPO signal). Each row is
a verl GSM8K-shaped chat row: a system prompt with a worked example, a second one as an earlier chat
turn, the question in one of four phrasings; data source `openai/gsm8k`, so verl's gsm8k rule judges it by its `#### N` answer (a binary judge with one
reference: the judge's contract applies). The regimes mirror tiny-arith's (tasks.make_regime):

  noisy         `noise_fraction` of the pool judged by a coin flip (reward_model.style "random")
  wrong-answer  `wrong_share` of the pool keyed with a wrong answer: `wrong_key(terms, phrasing, rng)`, by
                default the model's own commonest wrong answer (model_wrong_key); the ids in
                pool.truth.json, which no selector reads
  imbalance     `target_share` of the pool from the target domain, the validation set all target
  low-utility   `low_utility_share` of the pool trivial: n + 0 or 0 + n (n of two digits), the answer
                copies an operand

Truth for the benchmarks: tasks.regime_truth reads the same extra_info fields and side file.
"""

from __future__ import annotations

import collections
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

DATA_SOURCE = "openai/gsm8k"  # routed to verl's gsm8k rule: the number after the last `#### `
# Two worked examples: one in the system prompt, one as an earlier chat turn. Both in the system
# prompt, the model rarely writes `#### N` (pass rates 0-0.25 at T = 0.7, most problems never
# paid); both as chat turns, it adds two digits right 85% of the time at T = 0.7.
SYSTEM = (
    "You solve addition problems. Show the sum, then write the final answer on its own line as "
    "'#### N'.\nExample:\n4 + 2 = 6\n#### 6"
)
SHOT = ("What is 3 + 5?", "3 + 5 = 8\n#### 8")
PHRASINGS = ("What is {sum}?", "Add {list}.", "Compute {tight}.", "What is the sum of {list}?")
# What the audit's taught copy is supervised on: the worked examples' answer form.
TEACH_TEMPLATE = "#### {answer}"
MAX_TOKENS = 16  # "8 + 7 = 15\n#### 15" is about 12 tokens
TEMPERATURE = 1.0  # at 0.7 the model adds two digits right 75-90% of the time (one probe, 4 problems)


def _carry(rng: random.Random) -> tuple[int, ...]:
    while True:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if a + b >= 10:
            return a, b


def _no_carry(rng: random.Random) -> tuple[int, ...]:
    while True:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if a + b < 10:
            return a, b


# Two digits, with and without a carry: the imbalance regime's target domain is the carries.
DOMAINS: dict[str, Callable[[random.Random], tuple[int, ...]]] = {"carry": _carry, "nocarry": _no_carry}
TARGET_DOMAIN = "carry"


def question(terms: tuple[int, ...], phrasing: int) -> str:
    items = [str(t) for t in terms]
    words = ", ".join(items[:-1]) + " and " + items[-1]
    return PHRASINGS[phrasing].format(sum=" + ".join(items), list=words, tight="+".join(items))


def terms_of(text: str) -> tuple[int, ...]:
    """The numbers a question adds (every integer in it)."""
    return tuple(int(x) for x in re.findall(r"\d+", text))


def messages(terms: tuple[int, ...], phrasing: int) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": SHOT[0]},
        {"role": "assistant", "content": SHOT[1]},
        {"role": "user", "content": question(terms, phrasing)},
    ]


def row(
    terms: tuple[int, ...],
    phrasing: int,
    *,
    domain: str,
    split: str,
    index: int,
    style: str = "rule",
    key: int | None = None,
    corrupted: bool = False,
    target: bool = False,
    low_utility: bool = False,
) -> dict:
    """One problem as a verl RL row (demo.tasks.write_rows's schema), keyed with its sum unless `key`."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": messages(terms, phrasing),
        "ability": "math",
        "reward_model": {"style": style, "ground_truth": str(sum(terms) if key is None else key)},
        "extra_info": {
            "split": split,
            "index": index,
            "domain": domain,
            "corrupted": corrupted,
            "target": target,
            "low_utility": low_utility,
        },
    }


def model_path() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (converted once by scripts/smollm2.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from smollm2 import convert

    return convert()


def model_wrong_key(model: str | Path, samples: int = 16) -> Callable[[tuple[int, ...], int, random.Random], int]:
    """The model's commonest wrong `#### N` answer to a question among `samples` completions at
    temperature 1 (seeded from the regime's rng), as tasks.model_wrong_key draws tiny-arith's;
    the sum off by one where no completion gives a wrong number."""
    import torch

    from gradsel.inputs.models import load_causal_lm, load_tokenizer
    from gradsel.rewards.registry import gsm8k_answer

    tok, lm = load_tokenizer(model), load_causal_lm(model).eval()

    def wrong_key(terms: tuple[int, ...], phrasing: int, rng: random.Random) -> int:
        ids = tok.apply_chat_template(
            messages(terms, phrasing), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        torch.manual_seed(rng.randrange(2**31))
        with torch.no_grad():
            out = lm.generate(
                **ids,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                max_new_tokens=MAX_TOKENS,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        texts = tok.batch_decode(out[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = (gsm8k_answer(t) for t in texts)
        wrong = collections.Counter(
            a for a in answers if a is not None and re.fullmatch(r"\d+", a) and int(a) != sum(terms)
        )
        return int(wrong.most_common(1)[0][0]) if wrong else sum(terms) + rng.choice((-1, 1))

    return wrong_key


def make_regime(
    regime: str,
    *,
    size: int = 200,
    val_size: int = 40,
    seed: int = 0,
    noise_fraction: float = 0.5,
    target_share: float = 0.1,
    low_utility_share: float = 0.5,
    wrong_share: float = 0.4,
    wrong_key: Callable[[tuple[int, ...], int, random.Random], int] | None = None,
) -> tuple[list[dict], list[dict]]:
    """(pool rows, validation rows) for one regime; a pure function of its arguments (and of the
    model, through `wrong_key`)."""
    from gradsel.demo.tasks import REGIMES

    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    rng = random.Random(f"gradsel-smollm2/{regime}/{seed}")
    domains = list(DOMAINS)
    special_share = {
        "noisy": noise_fraction,
        "low-utility": low_utility_share,
        "wrong-answer": wrong_share,
        "imbalance": target_share,
    }.get(regime, 0.0)
    n_special = round(size * special_share)
    flags = [True] * n_special + [False] * (size - n_special)
    rng.shuffle(flags)
    pool = []
    for i, special in enumerate(flags):
        phrasing = rng.randrange(len(PHRASINGS))
        if regime == "low-utility" and special:
            n = rng.randint(10, 99)
            pool.append(
                row(
                    (n, 0) if rng.random() < 0.5 else (0, n),
                    phrasing,
                    domain="identity",
                    split="train",
                    index=i,
                    low_utility=True,
                )
            )
            continue
        if regime == "imbalance":
            domain = TARGET_DOMAIN if special else rng.choice([d for d in domains if d != TARGET_DOMAIN])
        else:
            domain = rng.choice(domains)
        terms = DOMAINS[domain](rng)
        key = None
        if regime == "wrong-answer" and special:
            key = (wrong_key or _near_miss)(terms, phrasing, rng)
        corrupted = regime == "noisy" and special
        pool.append(
            row(
                terms,
                phrasing,
                domain=domain,
                split="train",
                index=i,
                key=key,
                style="random" if corrupted else "rule",
                corrupted=corrupted,
                target=regime == "imbalance" and special,
            )
        )
    val_domains = [TARGET_DOMAIN] if regime == "imbalance" else domains
    val = []
    for j in range(val_size):
        domain = rng.choice(val_domains)
        val.append(
            row(
                DOMAINS[domain](rng),
                rng.randrange(len(PHRASINGS)),
                domain=domain,
                split="val",
                index=size + j,
                target=regime == "imbalance",
            )
        )
    return pool, val


def _near_miss(terms: tuple[int, ...], phrasing: int, rng: random.Random) -> int:
    return sum(terms) + rng.choice((-1, 1))


def true_answer(prompt_messages: list[dict]) -> str:
    """The right key of a bed problem, from its question (the last message)."""
    return str(sum(terms_of(prompt_messages[-1]["content"])))


def wrong_answer_truth(pool: list[dict]) -> dict:
    from gradsel.inputs.problems import problem_from_row

    wrong = [
        problem_from_row(r, i).problem_id
        for i, r in enumerate(pool)
        if r["reward_model"]["ground_truth"] != true_answer(r["prompt"])
    ]
    return {"wrong_answer_ids": wrong, "pool_size": len(pool)}


def write_regime(out_dir: Path, regime: str, **kwargs) -> tuple[Path, Path]:
    """As tasks.write_regime: pool.parquet, val.parquet and, for wrong-answer, pool.truth.json."""
    from gradsel.core.fsutil import atomic_write_json
    from gradsel.demo.tasks import TRUTH_FILE, write_rows

    pool, val = make_regime(regime, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool_path, val_path = out_dir / "pool.parquet", out_dir / "val.parquet"
    write_rows(pool, pool_path)
    write_rows(val, val_path)
    if regime == "wrong-answer":
        atomic_write_json(out_dir / TRUTH_FILE, wrong_answer_truth(pool))
    else:
        (out_dir / TRUTH_FILE).unlink(missing_ok=True)
    return pool_path, val_path


def pass_rate_spread(store: Path, data: Path, low: float = 0.1, high: float = 0.7) -> dict:
    """How mixed the model's pass rates are on a bed store's pool: per problem, the share of its
    rollouts its own judge paid, over the rows judged by the key (not coin-flipped) whose key is the
    true sum. Returns the count, the share within [low, high], the share never and always paid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsel.inputs.problems import read_problems
    from gradsel.rollout.stage import table_pass_rates

    shards = sorted((Path(store) / "rollouts" / "train").glob("shard-*.parquet"))
    rates = table_pass_rates(pa.concat_tables([pq.read_table(s) for s in shards]))
    clean = [
        rates[p.problem_id]
        for p in read_problems(Path(data) / "pool.parquet").problems
        if p.reward_style != "random" and p.ground_truth == true_answer(p.messages()) and p.problem_id in rates
    ]
    n = len(clean)
    return {
        "problems": n,
        "within": round(sum(low <= r <= high for r in clean) / n, 3),
        "never_paid": round(sum(r == 0 for r in clean) / n, 3),
        "always_paid": round(sum(r == 1 for r in clean) / n, 3),
        "mean": round(sum(clean) / n, 3),
    }


if __name__ == "__main__":  # python -m benchmarks.smollm2_bed KEEP_DIR...: pass-rate spread of kept runs
    import json

    for keep in sys.argv[1:]:
        print(json.dumps({"run": keep, **pass_rate_spread(Path(keep) / "store", Path(keep) / "data")}))
