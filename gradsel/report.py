"""Reports: what a store holds (`gradsel info`) and tables for the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from gradsel import console
from gradsel.store import Store, existing_store


def store_summary(path: Path) -> dict:
    import pyarrow.parquet as pq

    from gradsel.rounds import latest_round_store, round_selection

    top = Store(Path(path)).read_manifest()
    rounds = [{"round": r["round"], "checkpoint": r.get("checkpoint", "(incomplete)"), "model": r["model"],
               "offered": len(r["chunk_ids"]), "selected": len(round_selection(path, r) or [])}
              for r in top.get("rounds", [])]
    store = existing_store(latest_round_store(path))
    manifest = store.read_manifest()
    snap = manifest.get("snapshot") or {}
    summary: dict = {
        "store": str(path), "format_version": manifest.get("format_version"),
        "checkpoint": {"path": snap.get("source_path"), "content_hash": snap.get("content_hash")},
        "rollouts": {split: {"problems_file": r["problems_file"], "n": r["sampling"]["n"], "engine": r["engine"],
                             "rewards": r.get("rewards_by_data_source")}
                     for split, r in (manifest.get("rollouts") or {}).items()},
        "rounds": rounds,
    }
    spec = manifest.get("projector")
    if spec:
        summary["projector"] = {"feature": spec["feature"], "sketch": f"{spec['k_out']}x{spec['k_in']}",
                                "blocks": spec.get("blocks", 1), "modules": len(spec["modules"]), "seed": spec["seed"],
                                "alignment": manifest.get("alignment"), "val_agg": manifest.get("val_agg")}
    features = manifest.get("features")
    if features and (store.root / features / "scores.parquet").is_file():
        rows = [r for r in pq.read_table(store.root / features / "scores.parquet").to_pylist() if r["split"] == "train"]
        rates = np.array([r["pass_rate"] for r in rows])
        hist, _ = np.histogram(rates, bins=10, range=(0, 1))
        summary["candidates"] = {"scored": len(rows), "zero_advantage": sum(r["zero_advantage"] for r in rows),
                                 "pass_rate_histogram": hist.tolist()}
    return summary


def show_store(summary: dict) -> None:
    table = Table(title=f"store {summary['store']}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    ck = summary["checkpoint"]
    table.add_row("checkpoint", f"{ck['path']}  {str(ck['content_hash'])[:23]}")
    for split, r in summary["rollouts"].items():
        table.add_row(f"rollouts/{split}", f"k={r['n']} via {r['engine']} from {r['problems_file']}")
        if r.get("rewards"):
            table.add_row(f"rewards/{split}", ", ".join(f"{source or '(empty)'}: {name}"
                                                        for source, name in r["rewards"].items()))
    if "projector" in summary:
        p = summary["projector"]
        table.add_row("feature", f"{p['feature']} {p['sketch']} x{p['blocks']} over {p['modules']} modules, "
                      f"seed {p['seed']}, alignment {p['alignment']}, val {p['val_agg']}")
    if "candidates" in summary:
        c = summary["candidates"]
        table.add_row("candidates", f"{c['scored']} scored, {c['zero_advantage']} with zero advantage")
        bars = " ".join(f"{i / 10:.1f}:{n}" for i, n in enumerate(c["pass_rate_histogram"]))
        table.add_row("pass-rate histogram", bars)
    for r in summary["rounds"]:
        table.add_row(f"round {r['round']}", f"{r['model']} {str(r['checkpoint'])[:19]}: "
                      f"{r['offered']} offered, {r['selected']} selected")
    console.stderr.print(table)
