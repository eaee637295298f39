"""What a store holds, as `gradsel info` prints it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from gradsel.core import console
from gradsel.store.directory import Store, existing_store


def store_summary(path: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gradsel.pipeline.rounds import latest_round_store, round_selection

    top = Store(Path(path)).read_manifest()
    rounds = [
        {
            "round": r["round"],
            "checkpoint": r.get("checkpoint", "(incomplete)"),
            "model": r["model"],
            "offered": len(r["chunk_ids"]),
            "selected": len(round_selection(path, r) or []),
        }
        for r in top.get("rounds", [])
    ]
    store = existing_store(latest_round_store(path))
    manifest = store.read_manifest()
    snap = manifest.get("snapshot") or {}
    summary: dict = {
        "store": str(path),
        "format_version": manifest.get("format_version"),
        "checkpoint": {"path": snap.get("source_path"), "content_hash": snap.get("content_hash")},
        "rollouts": {
            split: {
                "problems_file": r["problems_file"],
                "n": r["sampling"]["n"],
                "engine": r["engine"],
                "rewards": rewards_by_source(r.get("rewards_by_data_source")),
                "contract": contract_shares(r.get("contract")),
            }
            for split, r in (manifest.get("rollouts") or {}).items()
        },
        "rounds": rounds,
        "costs": manifest.get("costs", {}),
        "warnings": data_warnings(manifest),
    }
    spec = manifest.get("projector")
    if spec:
        summary["projector"] = {
            "feature": spec["feature"],
            "sketch": f"{spec['k_out']}x{spec['k_in']}",
            "blocks": spec.get("blocks", 1),
            "modules": len(spec["modules"]),
            "seed": spec["seed"],
            "alignment": manifest.get("alignment"),
            "val_agg": manifest.get("val_agg"),
        }
    features = manifest.get("features")
    if features and (store.root / features / "scores.parquet").is_file():
        # Three columns, not a dict a row: `report` reads this summary of a million candidates too.
        table = pq.read_table(
            store.root / features / "scores.parquet", columns=["split", "pass_rate", "zero_advantage"]
        )
        train = table.filter(pc.equal(table.column("split"), "train"))
        hist, _ = np.histogram(train.column("pass_rate").to_numpy(), bins=10, range=(0, 1))
        summary["candidates"] = {
            "scored": train.num_rows,
            "zero_advantage": int(pc.sum(train.column("zero_advantage")).as_py() or 0),
            "pass_rate_histogram": hist.tolist(),
        }
    return summary


# What score_cos and score_dot are, by the store's `score --alignment` (the exact feature records exact).
ALIGNMENT_MEANING = {
    "sketch": "sketch: score_cos is estimated from the sketched vectors (`gradsel score --alignment lowrank` "
    "computes it in the gradient pass)",
    "lowrank": "lowrank: score_cos from the gradient pass, against the validation gradient truncated by SVD",
    "exact": "exact: score_cos against the full validation gradient",
}


def show_store(summary: dict) -> None:
    table = Table(title=f"store {summary['store']}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    ck = summary["checkpoint"]
    table.add_row("checkpoint", f"{ck['path']}  {str(ck['content_hash'])[:23]}")
    for split, r in summary["rollouts"].items():
        table.add_row(f"rollouts/{split}", f"k={r['n']} via {r['engine']} from {r['problems_file']}")
        if r.get("rewards"):
            table.add_row(f"rewards/{split}", describe_rewards_by_source(r["rewards"]))
        if r.get("contract"):
            table.add_row(f"judge contract/{split}", describe_contract(r["contract"]))
    add_warning_rows(table, summary)
    if "projector" in summary:
        p = summary["projector"]
        table.add_row(
            "feature",
            f"{p['feature']} {p['sketch']} x{p['blocks']} over {p['modules']} modules, "
            f"seed {p['seed']}, alignment {p['alignment']}, val {p['val_agg']}",
        )
        table.add_row("alignment", ALIGNMENT_MEANING.get(p["alignment"], str(p["alignment"])))
    if "candidates" in summary:
        c = summary["candidates"]
        table.add_row("candidates", f"{c['scored']} scored, {c['zero_advantage']} with zero advantage")
        bars = " ".join(f"{i / 10:.1f}:{n}" for i, n in enumerate(c["pass_rate_histogram"]))
        table.add_row("pass-rate histogram", bars)
    for stage, cost in ordered_costs(summary["costs"]).items():
        table.add_row(f"cost {stage}", describe_cost(cost))
    for r in summary["rounds"]:
        table.add_row(
            f"round {r['round']}",
            f"{r['model']} {str(r['checkpoint'])[:19]}: {r['offered']} offered, {r['selected']} selected",
        )
    console.stderr.print(table)


def rewards_by_source(recorded: dict | None) -> dict[str, dict[str, int | None]] | None:
    """The manifest's `rewards_by_data_source` as {source: {reward: rows}}. Stores written before
    every (source, reward) pair was counted recorded one reward name per source, without rows:
    those read as {source: {name: None}}."""
    if recorded is None:
        return None
    return {
        source: dict(rewards) if isinstance(rewards, dict) else {rewards: None} for source, rewards in recorded.items()
    }


def describe_rewards_by_source(rewards: dict[str, dict[str, int | None]]) -> str:
    """'openai/gsm8k: gsm8k 160, random 96; lighteval/MATH: math 40' (no counts where a store
    predates them)."""
    return "; ".join(
        f"{source or '(empty)'}: " + ", ".join(name if n is None else f"{name} {n}" for name, n in judges.items())
        for source, judges in rewards.items()
    )


def contract_shares(recorded: list[dict] | None) -> list[dict] | None:
    """Per (data source, reward) pair whose judge promises one paid answer (rewards.breaks_contract):
    its mixed problems, how many were paid two answers, and their share. None where the store's
    rollouts predate the record."""
    if recorded is None:
        return None
    return [
        {
            "data_source": c["data_source"],
            "reward": c["reward"],
            "mixed": c["mixed"],
            "broken": c["broken"],
            "share": round(c["broken"] / c["mixed"], 4) if c["mixed"] else 0.0,
        }
        for c in recorded
        if c["one_answer"]
    ]


def describe_contract(shares: list[dict]) -> str:
    """'arith/add2 random: 45 of 50 mixed problems paid two answers (90%); arith/add2 int: 0 of 60 (0%)'."""
    return "; ".join(
        f"{c['data_source'] or '(empty)'} {c['reward']}: {c['broken']} of {c['mixed']} mixed problems "
        f"paid two answers ({c['share']:.0%})"
        for c in shares
    )


def data_warnings(manifest: dict) -> list[str]:
    """The warnings the stages recorded about the data (e.g. a data source no rollout was paid on,
    payouts.py), each one line naming its stage."""
    return [w["message"] for run in (manifest.get("rollouts") or {}).values() for w in run.get("warnings", [])]


def add_warning_rows(table: Table, summary: dict) -> None:
    for message in summary.get("warnings", []):
        table.add_row("[yellow]warning[/yellow]", escape(message))


def describe_cost(cost: dict) -> str:
    """One line for a stage's cost (store.stage_cost): seconds, tokens/s, bytes, peak memory."""
    parts = [f"{cost['wall_s']:.1f} s"]
    if cost.get("tokens_per_s"):
        parts.append(f"{cost['tokens']:,} tokens at {cost['tokens_per_s']:,.0f}/s")
    if "bytes" in cost:
        parts.append(f"{human_bytes(cost['bytes'])} written")
    if "peak_rss_bytes" in cost:
        parts.append(f"peak RSS {human_bytes(cost['peak_rss_bytes'])}")
    if "peak_gpu_bytes" in cost:
        parts.append(f"peak GPU {human_bytes(cost['peak_gpu_bytes'])}")
    return ", ".join(parts)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


STAGE_ORDER = (
    "rollouts/train",
    "rollouts/val",
    "gradients",
    "validation-gradient",
    "gradients/val",
    "gradients/train",
    "scores",
)


def ordered_costs(costs: dict) -> dict:
    """Stage costs in pipeline order (the manifest keeps them sorted by name)."""
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return dict(sorted(costs.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))
