"""`gradsel report`: one self-contained HTML file that shows a store.

The plots are matplotlib figures inlined as SVG (text as text; a scatter of many points as one
embedded PNG): the file needs no script, no font and no network to view, and is a few hundred
KB. Sections: warnings about the data (where the stages recorded some), the pool's pass rates,
the selection's scores, what each mode would keep, judge consistency and validation alignment,
the rounds, per-stage cost, and provenance.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gradsel.core.choices import english_list
from gradsel.core.errors import GradselError
from gradsel.selection.modes import REGISTRY as MODE_RECORDS
from gradsel.selection.select import SelectConfig
from gradsel.store.vectors import VectorSet

# Modes compared in "what each mode would keep": those whose record says so (Mode.compared: not
# one that builds a FAISS index, which a report should not pay for, nor one that repeats another's order).
COMPARED_MODES = tuple(m.name for m in MODE_RECORDS.values() if m.compared)
RASTER_POINTS = 5000  # above this many points a scatter is embedded as one PNG, not one SVG path each


@dataclass(frozen=True)
class Section:
    title: str
    body: str  # HTML
    note: str = ""


def build_report(store_dir: Path, cfg: SelectConfig) -> str:
    """The report's HTML for a store (its latest round for a rounds store), with the selection
    `cfg` marked."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gradsel.pipeline.rounds import latest_round_store
    from gradsel.review.summary import store_summary
    from gradsel.selection.select import Candidates, load_score_table, mode_score_array, select
    from gradsel.selection.targets import resolve_target
    from gradsel.store.directory import existing_store

    summary = store_summary(store_dir)
    store = existing_store(latest_round_store(store_dir))
    manifest, table, directory = load_score_table(store)
    train = table.filter(pc.equal(table.column("split"), "train"))
    candidates = Candidates.from_table(train)
    sources = np.array(candidates.groups.get("data_source", [""] * len(candidates.ids)), dtype=object)
    asked = cfg  # the user's target: each compared mode resolves `auto` its own way (targets.resolve_target)
    cfg = replace(cfg, target=resolve_target(cfg.target, manifest["projector"]["feature"], cfg.mode))
    selection = select(store, cfg)
    picked = set(selection.problem_ids)
    chosen = np.fromiter((pid in picked for pid in candidates.ids), dtype=bool, count=len(candidates.ids))
    train, val = VectorSet(directory, "train"), VectorSet(directory, "val")
    scores = mode_score_array(candidates, cfg, train, val, fetch=len(candidates.ids))
    k = len(selection.problem_ids)
    by_mode = {}
    for mode in COMPARED_MODES:
        if mode == cfg.mode:  # the selection above, of that size already
            by_mode[mode] = selection.problem_ids
            continue
        try:
            by_mode[mode] = select(
                store, replace(asked, mode=mode, top_k=k, ratio=None, all=False, allow_fewer=True)
            ).problem_ids
        except GradselError:  # a mode with nothing eligible is left out of the comparison
            continue
    history = Path(store_dir) / "history.parquet"
    sections = [
        *_warnings(summary),
        *_contract(summary),
        _pass_rates(candidates, sources),
        _scores(candidates, sources, scores, chosen, cfg),
        _modes(by_mode, dict(zip(candidates.ids, sources)), cfg.mode),
        _distributions(candidates, sources, train, val, manifest),
        _rounds(summary, pq.read_table(history, columns=["round", "score_cos"]) if history.is_file() else None),
        _costs(summary.get("costs", {})),
        _provenance(summary, manifest),
    ]
    title = f"gradsel report: {Path(store_dir).name}"
    lead = (
        f"{len(candidates.ids):,} candidates from {len(set(sources)):,} data sources; "
        f"<b>{k:,}</b> selected by <code>--mode {cfg.mode} --target {cfg.target}</code> "
        f"({_how_many(cfg)}), of {selection.eligible:,} eligible."
    )
    return _page(title, lead, sections)


def write_report(store_dir: Path, out: Path, cfg: SelectConfig, force: bool = False) -> int:
    """Write the report; return its size in bytes. An existing file needs `force`; an `out`
    that cannot be written is refused before any work, as `select` refuses one."""
    from gradsel.core.fsutil import atomic_write_bytes
    from gradsel.selection.formats import check_out_path

    check_out_path(str(out), force)
    data = build_report(store_dir, cfg).encode()
    atomic_write_bytes(out, data)
    return len(data)


def _how_many(cfg: SelectConfig) -> str:
    return "--all" if cfg.all else f"--top-k {cfg.top_k}" if cfg.top_k is not None else f"--ratio {cfg.ratio}"


# -- sections -------------------------------------------------------------------------------------


def _pass_rates(c, sources: np.ndarray) -> Section:
    plt = _pyplot()
    groups = sorted(set(sources))
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bins = np.linspace(0, 1, 11)
    labels = []
    for g in groups:
        mask = sources == g
        zero = c.zero_advantage[mask].mean() if mask.any() else 0.0
        labels.append(f"{g or '(none)'} (n={mask.sum():,}, zero advantage {zero:.0%})")
    ax.hist([c.pass_rate[sources == g] for g in groups], bins=bins, stacked=True, label=labels)
    ax.set_xlabel("pass rate (share of the k rollouts rewarded)")
    ax.set_ylabel("problems")
    ax.legend(fontsize=7, frameon=False)
    note = (
        f"{c.zero_advantage.mean():.0%} of the pool has zero advantage (every rollout rewarded alike): "
        "no GRPO signal, left out of every selection unless --include-zero-advantage."
    )
    return Section("Pass rates by data source", _svg(fig), note)


def _scores(c, sources: np.ndarray, scores: np.ndarray, chosen: np.ndarray, cfg: SelectConfig) -> Section:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    # Pass rates are multiples of 1/k: a fixed jitter keeps the points apart.
    jitter = np.random.default_rng(0).uniform(-0.012, 0.012, len(scores))
    finite = np.isfinite(scores)
    raster = len(scores) > RASTER_POINTS
    for g in sorted(set(sources)):
        mask = (sources == g) & finite
        ax.scatter(
            c.pass_rate[mask] + jitter[mask],
            scores[mask],
            s=9,
            alpha=0.7,
            label=g or "(none)",
            rasterized=raster,
            linewidths=0,
        )
    ax.scatter(
        c.pass_rate[chosen & finite] + jitter[chosen & finite],
        scores[chosen & finite],
        s=36,
        facecolors="none",
        edgecolors="black",
        linewidths=0.8,
        label="selected",
        rasterized=raster,
    )
    ax.set_xlabel("pass rate")
    ax.set_ylabel(f"{cfg.mode} score (target {cfg.target})")
    ax.legend(fontsize=7, frameon=False, loc="best")
    return Section("Score against pass rate", _svg(fig), "Rings mark the selected problems.")


def _modes(by_mode: dict[str, list[str]], source_of: dict[str, str], current: str) -> Section:
    plt = _pyplot()
    modes = list(by_mode)
    groups = sorted(set(source_of.values()))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1.3, 1]})
    shares = np.array(
        [[sum(source_of[p] == g for p in by_mode[m]) / max(len(by_mode[m]), 1) for g in groups] for m in modes]
    )
    base = np.zeros(len(modes))
    for j, g in enumerate(groups):
        left.barh(modes, shares[:, j], left=base, label=g or "(none)")
        base += shares[:, j]
    left.invert_yaxis()
    left.set_xlabel("share of the selection")
    left.set_xlim(0, 1)
    left.legend(fontsize=7, frameon=False, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    sets = [set(by_mode[m]) for m in modes]
    overlap = np.array([[len(a & b) / max(len(a | b), 1) for b in sets] for a in sets])
    im = right.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    right.set_xticks(range(len(modes)), modes, rotation=45, ha="right", fontsize=8)
    right.set_yticks(range(len(modes)), modes, fontsize=8)
    for i in range(len(modes)):
        for j in range(len(modes)):
            right.text(
                j,
                i,
                f"{overlap[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if overlap[i, j] < 0.6 else "black",
            )
    fig.colorbar(im, ax=right, label="Jaccard overlap")
    note = (
        f"Each mode takes as many problems as --mode {current} did. Left: data sources in each "
        "selection; right: how much two selections share. Left out: "
        f"{english_list(m for m in MODE_RECORDS if m not in COMPARED_MODES)}, which query a FAISS index "
        "or repeat another mode's order, and --target max, which queries one."
    )
    return Section("What each mode would keep", _svg(fig), note)


def _distributions(c, sources: np.ndarray, train: VectorSet, val: VectorSet, manifest: dict) -> Section:
    plt = _pyplot()
    has_vectors = bool(train.shards)
    fig, axes = plt.subplots(1, 3 if has_vectors else 2, figsize=(10, 3.0))
    live = ~c.zero_advantage
    axes[0].hist(c.consistency[live], bins=np.linspace(0, 1, 21), color="tab:purple")
    axes[0].set_xlabel("judge consistency")
    axes[0].set_ylabel("problems (non-zero advantage)")
    axes[1].hist(c.score_cos[live], bins=40, color="tab:green")
    axes[1].set_xlabel(f"cosine with the validation gradient\n(--alignment {manifest.get('alignment')})")
    if has_vectors:
        from gradsel.selection.targets import subspace_scores

        axes[2].hist(subspace_scores(c.ids, c.rows, train, val)[live], bins=40, color="tab:orange")
        axes[2].set_xlabel("share in the validation span\n(--target subspace)")
    note = (
        "Judge consistency is 1 where identical answers always got the same reward; below 1 the "
        "reference or the judge disagrees with itself. Alignment: how the candidates' gradients "
        "relate to the validation set's."
    )
    return Section("Judge consistency and validation alignment", _svg(fig), note)


def _rounds(summary: dict, history) -> Section:
    """`history`: the rounds' scores (history.parquet's round and score_cos columns), or None."""
    rounds = summary["rounds"]
    if not rounds:
        return Section(
            "Rounds", "<p>This store has one round: `gradsel score --chunk-size M` and `gradsel refresh` make more.</p>"
        )
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [f"round {r['round']}" for r in rounds]
    left.bar(names, [r["offered"] for r in rounds], color="lightgray", label="offered")
    left.bar(names, [r["selected"] for r in rounds], color="tab:blue", label="selected")
    left.set_ylabel("problems")
    left.legend(fontsize=7, frameon=False)
    numbers = history.column("round").to_numpy() if history is not None else np.zeros(0, int)
    scores = history.column("score_cos").to_numpy() if history is not None else np.zeros(0)
    by_round = [scores[numbers == r["round"]] for r in rounds]
    right.boxplot([v if len(v) else [np.nan] for v in by_round], tick_labels=names)
    right.set_ylabel("score_cos")
    right.set_title("scores at each round's checkpoint", fontsize=9)
    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{html.escape(str(r['model']))}</td>"
        f"<td><code>{html.escape(str(r['checkpoint'])[:23])}</code></td><td>{r['offered']}</td>"
        f"<td>{r['selected']}</td></tr>"
        for r in rounds
    )
    table = f"<table><tr><th>round</th><th>model</th><th>checkpoint</th><th>offered</th><th>selected</th></tr>{rows}</table>"
    return Section(
        "Rounds", _svg(fig) + table, "Score drift: each round is scored at its own checkpoint (history.parquet)."
    )


def _warnings(summary: dict) -> list[Section]:
    """The warnings recorded about the data, first, where there are any."""
    if not summary.get("warnings"):
        return []
    items = "".join(f"<li>{html.escape(message)}</li>" for message in summary["warnings"])
    return [Section("Warnings", f'<ul class="warnings">{items}</ul>')]


def _contract(summary: dict) -> list[Section]:
    """Per data source and reward whose judge promises one paid answer, the share of its mixed
    problems paid two (rewards.breaks_contract), where the rollouts recorded it."""
    rows = [(split, c) for split, r in summary["rollouts"].items() for c in r.get("contract") or []]
    if not rows:
        return []
    from gradsel.rewards.payouts import CONTRACT_SHARE

    broken = ' class="broken"'
    body = "".join(
        f"<tr{broken if c['share'] > CONTRACT_SHARE else ''}><td>{html.escape(split)}</td>"
        f"<td>{html.escape(c['data_source'] or '(empty)')}</td><td>{html.escape(c['reward'])}</td>"
        f"<td>{c['mixed']}</td><td>{c['broken']}</td><td>{c['share']:.0%}</td></tr>"
        for split, c in rows
    )
    table = (
        "<table><tr><th>split</th><th>data_source</th><th>reward</th><th>mixed problems</th>"
        f"<th>paid two answers</th><th>share</th></tr>{body}</table>"
    )
    return [
        Section(
            "Judge contract",
            table,
            "A binary judge that compares an answer with one reference pays at most one answer per problem. "
            "A problem paid two different answers breaks that, and ranks last in the default selection; a "
            f"source above {CONTRACT_SHARE:.0%} (in red) has a reward function that ignores the answer.",
        )
    ]


def _costs(costs: dict) -> Section:
    from gradsel.review.summary import describe_cost, ordered_costs

    if not costs:
        return Section("Cost per stage", "<p>This store predates cost records.</p>")
    plt = _pyplot()
    costs = ordered_costs(costs)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(costs) + 0.8))
    ax.barh(list(costs), [c["wall_s"] for c in costs.values()], color="tab:gray")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (summed over processes)")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(describe_cost(c))}</td></tr>" for name, c in costs.items()
    )
    return Section(
        "Cost per stage",
        _svg(fig) + f"<table>{rows}</table>",
        "Recorded when each stage completed; shards made by several processes sum their seconds.",
    )


def _provenance(summary: dict, manifest: dict) -> Section:
    import json

    from gradsel.review.summary import describe_rewards_by_source

    rows = {
        "store": summary["store"],
        "format version": summary["format_version"],
        "checkpoint": summary["checkpoint"]["path"],
        "content hash": summary["checkpoint"]["content_hash"],
    }
    for split, r in summary["rollouts"].items():
        rows[f"rollouts/{split}"] = f"k={r['n']} via {r['engine']} from {r['problems_file']}"
        if r.get("rewards"):
            rows[f"rewards/{split}"] = describe_rewards_by_source(r["rewards"])
    rows["projector"] = json.dumps(
        {k: v for k, v in (manifest.get("projector") or {}).items() if k not in ("modules", "dims")}
    )
    rows["modules"] = f"{len((manifest.get('projector') or {}).get('modules', []))}"
    rows["loss"] = json.dumps(manifest.get("loss"))
    rows["library versions"] = json.dumps(manifest.get("library_versions"))
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows.items()
    )
    return Section("Projector and provenance", f"<table>{body}</table>")


# -- rendering ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: figures go to SVG
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": "gradsel",
            "font.size": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _svg(fig) -> str:
    """The figure as inline SVG markup, deterministic (no date, fixed ids)."""
    plt = _pyplot()
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg", metadata={"Date": None}, dpi=110)
    plt.close(fig)
    text = buffer.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.S)  # RDF, no content
    return '<figure class="plot">' + svg + "</figure>"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1080px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure.plot { margin: 0.5em 0; } figure.plot svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
code { font-size: 0.9em; word-break: break-all; } p.note { color: #555; }
ul.warnings li { color: #8a4b00; margin: 0.3em 0; }
tr.broken td { color: #b00020; font-weight: bold; }
"""


def _page(title: str, lead: str, sections: list[Section]) -> str:
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{lead}</p>",
    ]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>{s.body}")
        if s.note:
            parts.append(f'<p class="note">{html.escape(s.note)}</p>')
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)
