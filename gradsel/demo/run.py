"""`gradsel demo`: the whole pipeline on the bundled tiny model and a noisy arithmetic pool.

Half the pool is judged by a coin flip. The demo scores the pool, selects a quarter of it with
GradAlign and with two baselines, and shows how many coin-flip problems each selection kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from gradsel.core import console
from gradsel.demo.tasks import write_regime
from gradsel.gradients.stage import ScoreConfig
from gradsel.inputs.problems import read_problems
from gradsel.pipeline.score import RolloutOptions, run_score
from gradsel.selection.formats import write_selection
from gradsel.selection.select import SelectConfig, select
from gradsel.store.directory import open_store

# The paper's method as published (`--mode gradalign`: the cosine with the validation set's
# gradient), gradsel's default, and the two baselines whose failure the paper reports.
DEMO_SELECTORS = {
    "gradalign": {"mode": "gradalign"},
    "reliable": {},
    "accgreedy": {"mode": "accgreedy"},
    "random": {"mode": "random"},
}


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_demo(out: Path, *, model: str, size: int, n: int, engine: str, seed: int, ratio: float = 0.25) -> dict:
    pool_path, val_path = write_regime(out / "data", "noisy", size=size, val_size=40, seed=seed)
    console.info(
        f"[bold]1. data[/bold]  {pool_path}: {size} problems, half judged by a coin flip; "
        f"{val_path}: 40 clean validation problems"
    )
    ro = RolloutOptions(n=n, engine=engine, max_tokens=8, seed=seed)
    store_dir = out / "store"
    console.info(f"[bold]2. score[/bold]  {model}, k={n} rollouts per problem, projected GRPO gradients")
    projected = run_score(store_dir, model=model, pool=pool_path, val=val_path, ro=ro, sc=ScoreConfig(seed=seed))
    console.info("[bold]3. check[/bold]  exact full gradients on the same rollouts (the reference algorithm)")
    exact = run_score(
        store_dir,
        model=model,
        pool=pool_path,
        val=val_path,
        ro=ro,
        sc=ScoreConfig(seed=seed, feature="exact", modules=r"\.layers\.\d+\."),
    )
    agreement = _agreement(projected.scores, exact.scores)
    # Selection reads the store's current feature set: scoring the projected one again (cached)
    # makes it current.
    run_score(store_dir, model=model, pool=pool_path, val=val_path, ro=ro, sc=ScoreConfig(seed=seed))

    console.info(f"[bold]4. select[/bold]  top {ratio:.0%} of the pool by each mode")
    truth = {p.problem_id: bool(p.extra_info.get("corrupted")) for p in read_problems(pool_path).problems}
    store = open_store(store_dir)
    results = {}
    for mode, options in DEMO_SELECTORS.items():
        cfg = SelectConfig(ratio=ratio, seed=seed, allow_fewer=True, **options)
        selection = select(store, cfg)
        path = out / "selections" / f"{mode}.parquet"
        write_selection(store, selection, fmt="verl", out=str(path), annotate=False, force=True)
        share = sum(truth[p] for p in selection.problem_ids) / max(len(selection.problem_ids), 1)
        results[mode] = {"selected": len(selection.problem_ids), "corrupted_share": share, "file": str(path)}
    _show(results, agreement, size)
    return {"modes": results, "projected_vs_exact_spearman": agreement}


def _agreement(projected, exact) -> float:
    p = {
        r["problem_id"]: r["score_cos"]
        for r in projected.to_pylist()
        if r["split"] == "train" and not r["zero_advantage"]
    }
    e = {
        r["problem_id"]: r["score_cos"] for r in exact.to_pylist() if r["split"] == "train" and not r["zero_advantage"]
    }
    ids = sorted(p)
    return spearman([p[i] for i in ids], [e[i] for i in ids]) if len(ids) > 2 else float("nan")


def _show(results: dict, agreement: float, size: int) -> None:
    table = Table(title=f"Which selection kept the coin-flip problems? (pool {size}, half corrupted)")
    for col in ("mode", "selected", "corrupted share", "output"):
        table.add_column(col, justify="left" if col in ("mode", "output") else "right")
    for mode, r in results.items():
        table.add_row(mode, str(r["selected"]), f"{r['corrupted_share']:.0%}", r["file"])
    console.stderr.print(table)
    console.info(f"projected vs exact gradient cosine, Spearman over non-zero-advantage problems: {agreement:.3f}")
