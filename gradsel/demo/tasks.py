"""The bundled arithmetic task: problem format, domains and the demo-data regimes.

The format is a stable contract (tests, the bundled model and outside checks rely on it):
the prompt text is exactly ``{a}{op}{b}=`` with op in ``+ - *`` and the answer is the
decimal integer, with a leading ``-`` when negative.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from gradsel.core.choices import REGIMES

ABILITY = "arithmetic"
# Beside the pool of the wrong-answer regime: which rows carry a wrong reference answer. Kept out
# of the rows themselves, so that no selector can read it.
TRUTH_FILE = "pool.truth.json"
# What the demo's rows carry in extra_info beyond verl's split and index: the domain, and the labels
# the benchmarks read and gradsel never does (a coin-flip judge, the imbalance regime's target
# domain, a trivial identity). Declared here, not in the product's schema.
DEMO_EXTRA_INFO = (
    ("domain", pa.string()),
    ("corrupted", pa.bool_()),
    ("target", pa.bool_()),
    ("low_utility", pa.bool_()),
)


@dataclass(frozen=True)
class Domain:
    name: str
    op: str
    a_range: tuple[int, int]  # inclusive
    b_range: tuple[int, int]  # inclusive

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(*self.a_range), rng.randint(*self.b_range)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("add1", "+", (0, 9), (0, 9)),
        Domain("add2", "+", (10, 99), (10, 99)),
        Domain("sub2", "-", (10, 99), (10, 99)),
        Domain("mul", "*", (10, 99), (2, 9)),
    )
}
# Trivial identities: the answer copies an operand, so they exercise no carry, borrow or
# times-table skill. They are the "low-utility" share of the low-utility regime.
IDENTITY_FORMS = ("a+0", "0+a", "a-0", "a*1", "1*a")


def prompt_text(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def answer_of(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def identity_problem(rng: random.Random) -> tuple[int, str, int]:
    form = rng.choice(IDENTITY_FORMS)
    x = rng.randint(10, 99)
    a_text, op, b_text = form[0], form[1], form[2]
    a = x if a_text == "a" else int(a_text)
    b = x if b_text == "a" else int(b_text)
    return a, op, b


def verl_row(
    a: int,
    op: str,
    b: int,
    *,
    domain: str,
    split: str,
    index: int,
    style: str = "rule",
    corrupted: bool = False,
    target: bool = False,
    low_utility: bool = False,
) -> dict:
    """One problem as a verl RL row (write_rows's schema: verl's, with DEMO_EXTRA_INFO)."""
    return {
        "data_source": f"arith/{domain}",
        "prompt": [{"role": "user", "content": prompt_text(a, op, b)}],
        "ability": ABILITY,
        "reward_model": {"style": style, "ground_truth": str(answer_of(a, op, b))},
        "extra_info": {
            "split": split,
            "index": index,
            "domain": domain,
            "corrupted": corrupted,
            "target": target,
            "low_utility": low_utility,
        },
    }


def _digits_slip(a: int, b: int, op: str) -> int:
    """The answer with one carry (addition, multiplication) or borrow (subtraction) forgotten:
    each column computed on its own, as a hurried pupil does. Equal to the true answer when
    no column carries or borrows."""
    if op == "-":
        if a < b:
            return -_digits_slip(b, a, op)
        da, db = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
        return int("".join(str(abs(int(x) - int(y))) for x, y in zip(da, db))[::-1])
    if op == "+":
        da, db = str(a)[::-1], str(b)[::-1]
        width = max(len(da), len(db))
        da, db = da.ljust(width, "0"), db.ljust(width, "0")
        return int("".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db))[::-1])
    # a * b with b one digit: each digit of a times b, keeping only the units of each product
    return int("".join(str(int(x) * b % 10) for x in str(a)))


def wrong_answer(a: int, op: str, b: int, rng: random.Random) -> int:
    """A plausible wrong answer, as a careless solution or a bad answer key holds it: a carry or
    borrow slip, one digit off by one, or two adjacent digits swapped. Never the true answer."""
    truth = answer_of(a, op, b)
    sign, digits = ("-" if truth < 0 else ""), str(abs(truth))
    slip = _digits_slip(a, b, op)
    candidates = {slip}
    for i in range(len(digits)):
        for step in (-1, 1):
            d = int(digits[i]) + step
            if 0 <= d <= 9 and not (i == 0 and d == 0 and len(digits) > 1):
                candidates.add(int(sign + digits[:i] + str(d) + digits[i + 1 :]))
    for i in range(len(digits) - 1):
        if digits[i] != digits[i + 1] and not (i == 0 and digits[i + 1] == "0"):
            candidates.add(int(sign + digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]))
    candidates.discard(truth)
    # The slip first where there is one: it is the error a model or an annotator actually makes.
    if slip != truth and rng.random() < 0.5:
        return slip
    return rng.choice(sorted(candidates))


def _mixed(rng: random.Random, domains: list[str]) -> tuple[str, int, str, int]:
    name = rng.choice(domains)
    dom = DOMAINS[name]
    a, b = dom.sample(rng)
    return name, a, dom.op, b


def make_regime(
    regime: str,
    *,
    size: int = 400,
    val_size: int = 40,
    seed: int = 0,
    noise_fraction: float = 0.5,
    target_domain: str = "sub2",
    target_share: float = 0.1,
    low_utility_share: float = 0.5,
    wrong_share: float = 0.4,
    wrong_key: Callable[[int, str, int, random.Random], int] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Return (pool rows, validation rows) for one regime. Pure function of its arguments.

    In the wrong-answer regime a `wrong_share` of the pool carries a plausible wrong reference
    answer (`wrong_answer`, or `wrong_key(a, op, b, rng)` when given: benchmarks/quality.py's
    `--wrong-keys model` draws the model's own commonest wrong answer), judged by the ordinary
    exact judge; the rows do not say which (`wrong_answer_truth` does)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    rng = random.Random(f"gradsel-demo-data/{regime}/{seed}")
    all_domains = list(DOMAINS)
    pool: list[dict] = []
    val: list[dict] = []

    if regime == "imbalance":
        others = [d for d in all_domains if d != target_domain]
        n_target = round(size * target_share)
        flags = [True] * n_target + [False] * (size - n_target)
        rng.shuffle(flags)
        for i, is_target in enumerate(flags):
            name, a, op, b = _mixed(rng, [target_domain] if is_target else others)
            pool.append(verl_row(a, op, b, domain=name, split="train", index=i, target=is_target))
        val_domains = [target_domain]
    else:
        n_special = 0
        if regime == "noisy":
            n_special = round(size * noise_fraction)
        elif regime == "low-utility":
            n_special = round(size * low_utility_share)
        elif regime == "wrong-answer":
            n_special = round(size * wrong_share)
        flags = [True] * n_special + [False] * (size - n_special)
        rng.shuffle(flags)
        for i, special in enumerate(flags):
            if regime == "low-utility" and special:
                a, op, b = identity_problem(rng)
                pool.append(verl_row(a, op, b, domain="identity", split="train", index=i, low_utility=True))
                continue
            name, a, op, b = _mixed(rng, all_domains)
            corrupted = regime == "noisy" and special
            row = verl_row(
                a,
                op,
                b,
                domain=name,
                split="train",
                index=i,
                style="random" if corrupted else "rule",
                corrupted=corrupted,
            )
            if regime == "wrong-answer" and special:
                row["reward_model"]["ground_truth"] = str((wrong_key or wrong_answer)(a, op, b, rng))
            pool.append(row)
        val_domains = all_domains

    for j in range(val_size):
        name, a, op, b = _mixed(rng, val_domains)
        val.append(verl_row(a, op, b, domain=name, split="val", index=size + j, target=regime == "imbalance"))
    return pool, val


def wrong_answer_truth(pool: list[dict]) -> dict:
    """The side file's content: the ids of the rows whose reference answer is wrong."""
    from gradsel.inputs.problems import problem_from_row

    wrong = []
    for i, row in enumerate(pool):
        a, op, b = parse_prompt(row["prompt"][0]["content"])
        if row["reward_model"]["ground_truth"] != str(answer_of(a, op, b)):
            wrong.append(problem_from_row(row, i).problem_id)
    return {"wrong_answer_ids": wrong, "pool_size": len(pool)}


def parse_prompt(text: str) -> tuple[int, str, int]:
    """`{a}{op}{b}=` back to (a, op, b)."""
    body = text.removesuffix("=")
    for i in range(1, len(body)):
        if body[i] in "+-*":
            return int(body[:i]), body[i], int(body[i + 1 :])
    raise ValueError(f"not an arithmetic prompt: {text!r}")


def write_regime(out_dir: Path, regime: str, **kwargs) -> tuple[Path, Path]:
    """Write ``pool.parquet`` and ``val.parquet`` (verl schema) into ``out_dir``; for the
    wrong-answer regime also ``pool.truth.json`` (which rows are wrong)."""
    from gradsel.core.fsutil import atomic_write_json

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


def write_rows(rows: list[dict], path: Path) -> None:
    """Demo rows as a verl Parquet file, their labels in extra_info (DEMO_EXTRA_INFO)."""
    from gradsel.core.fsutil import atomic_write_table
    from gradsel.core.schema import verl_problems

    atomic_write_table(path, pa.Table.from_pylist(rows, schema=verl_problems(DEMO_EXTRA_INFO)))
