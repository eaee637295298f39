"""The bundled arithmetic task: problem format, domains and the demo-data regimes.

The format is a stable contract (tests, the bundled model and outside checks rely on it):
the prompt text is exactly ``{a}{op}{b}=`` with op in ``+ - *`` and the answer is the
decimal integer, with a leading ``-`` when negative.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

ABILITY = "arithmetic"
REGIMES = ("clean", "noisy", "imbalance", "low-utility")


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
    a: int, op: str, b: int, *, domain: str, split: str, index: int, style: str = "rule",
    corrupted: bool = False, target: bool = False, low_utility: bool = False,
) -> dict:
    """One problem as a verl RL row (DESIGN.md section 5)."""
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


def _mixed(rng: random.Random, domains: list[str]) -> tuple[str, int, str, int]:
    name = rng.choice(domains)
    dom = DOMAINS[name]
    a, b = dom.sample(rng)
    return name, a, dom.op, b


def make_regime(
    regime: str, *, size: int = 400, val_size: int = 40, seed: int = 0,
    noise_fraction: float = 0.5, target_domain: str = "sub2", target_share: float = 0.1,
    low_utility_share: float = 0.5,
) -> tuple[list[dict], list[dict]]:
    """Return (pool rows, validation rows) for one regime. Pure function of its arguments."""
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
        flags = [True] * n_special + [False] * (size - n_special)
        rng.shuffle(flags)
        for i, special in enumerate(flags):
            if regime == "low-utility" and special:
                a, op, b = identity_problem(rng)
                pool.append(verl_row(a, op, b, domain="identity", split="train", index=i,
                                     low_utility=True))
                continue
            name, a, op, b = _mixed(rng, all_domains)
            corrupted = regime == "noisy" and special
            pool.append(verl_row(a, op, b, domain=name, split="train", index=i,
                                 style="random" if corrupted else "rule", corrupted=corrupted))
        val_domains = all_domains

    for j in range(val_size):
        name, a, op, b = _mixed(rng, val_domains)
        val.append(verl_row(a, op, b, domain=name, split="val", index=size + j,
                            target=regime == "imbalance"))
    return pool, val


def write_regime(out_dir: Path, regime: str, **kwargs) -> tuple[Path, Path]:
    """Write ``pool.parquet`` and ``val.parquet`` (verl schema) into ``out_dir``."""
    from gradsel.problems import write_verl_parquet

    pool, val = make_regime(regime, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool_path, val_path = out_dir / "pool.parquet", out_dir / "val.parquet"
    write_verl_parquet(pool, pool_path)
    write_verl_parquet(val, val_path)
    return pool_path, val_path
