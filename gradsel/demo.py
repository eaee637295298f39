"""`gradsel demo`: the pipeline end to end on the bundled tiny model and a noisy pool."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.table import Table

from gradsel import console
from gradsel.models import resolve_model_path
from gradsel.problems import read_problems
from gradsel.rollout import SamplingConfig, run_rollout_stage, table_pass_rates
from gradsel.snapshot import snapshot_into_store
from gradsel.store import open_store
from gradsel.tasks import write_regime


def run_demo(out: Path, *, model: str, size: int, n: int, engine: str, seed: int) -> None:
    model_path = resolve_model_path(model)
    pool_path, _ = write_regime(out / "data", "noisy", size=size, seed=seed)
    console.info(f"noisy pool: {pool_path} ({size} problems, half with a coin-flip judge)")
    problem_set = read_problems(pool_path)
    store = open_store(out / "store")
    snap = snapshot_into_store(store, model_path)
    cfg = SamplingConfig(n=n, temperature=1.0, max_tokens=8, seed=seed)
    table = run_rollout_stage(store, "train", problem_set, model_path=Path(snap.path),
                              model_hash=snap.content_hash, cfg=cfg, engine=engine)
    show_pass_rates(problem_set.problems, table_pass_rates(table),
                    title=f"{model}: pass rate at temperature 1.0, k={n}")


def show_pass_rates(problems, rates: dict[str, float], title: str) -> None:
    by_domain: dict[str, list[float]] = defaultdict(list)
    for p in problems:
        key = p.data_source + (" (coin-flip judge)" if p.reward_style == "random" else "")
        by_domain[key].append(rates[p.problem_id])
    table = Table(title=title)
    for col in ("data source", "problems", "mean pass rate", "0 < pass < 1"):
        table.add_column(col, justify="left" if col == "data source" else "right")
    for key in sorted(by_domain):
        vals = by_domain[key]
        mixed = sum(0 < v < 1 for v in vals) / len(vals)
        table.add_row(key, str(len(vals)), f"{sum(vals) / len(vals):.2f}", f"{mixed:.0%}")
    console.stderr.print(table)
