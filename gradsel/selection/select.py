"""Selection: rank the scored candidates by a mode and filter them (gradsel.selection.formats
emits the chosen rows).

The modes (the paper's method, its baselines, and gradsel's default, reliable: docs/algorithm.md,
docs/research/quality.md) are records, one each, in gradsel.selection.modes.
Zero-advantage problems (every reward equal) carry no GRPO signal and are left out unless asked.
`--target max` replaces the cosine of the modes that honour it (gradalign, simacc, reliable) by the
best cosine with any single validation problem (LESS-style), through the candidate FAISS index
(gradsel.selection.index).
`--target subspace` replaces it by how much of the candidate's gradient the validation problems'
gradients span, whatever the sign: per module, the cosine between the candidate's slice and their
span, averaged over the modules (gradsel.selection.targets).
`--target auto` (the default) is the paper's target, mean (the cosine with the validation set's
gradient), for the paper's modes (gradalign, dot, simacc), so that `--mode gradalign` is the paper's
method; for gradsel's own default, reliable, it is subspace where the store holds gradient vectors
(mean for the `exact` feature, which stores none). The other modes read no target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gradsel.core import console
from gradsel.core.choices import TARGETS
from gradsel.core.errors import GradselError
from gradsel.selection.index import index_alignment, resolve_kind
from gradsel.selection.modes import MODES, ModeInputs
from gradsel.selection.modes import REGISTRY as MODE_RECORDS
from gradsel.selection.targets import live_validation_vectors, resolve_target, subspace_scores
from gradsel.store.vectors import VectorSet

BALANCE_COLUMNS = ("data_source",)  # the scores' columns that name groups (schema.SCORES)


@dataclass(frozen=True)
class SelectConfig:
    mode: str = "reliable"
    top_k: int | None = None
    ratio: float | None = None
    all: bool = False
    band: tuple[float, float] = (0.0, 1.0)
    min_score: float | None = None
    include_zero_advantage: bool = False
    balance: str | None = None  # a column of the scores table, e.g. data_source
    balance_weights: tuple[tuple[str, float], ...] | None = None  # group -> weight; None: pool shares
    diverse: float | None = None  # MMR trade-off in (0, 1]; 1 = score only
    target: str = "auto"  # mean: the validation direction; max: best single validation problem;
    # subspace: the share in the validation vectors' span, per module; auto: resolve_target
    index: str = "auto"  # the FAISS index over the candidate vectors (gradsel.selection.index)
    seed: int = 0
    allow_fewer: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise GradselError(f"unknown mode {self.mode!r}", f"choose one of {', '.join(MODES)}")
        if sum(x is not None and x is not False for x in (self.top_k, self.ratio, self.all or None)) != 1:
            raise GradselError(
                "give exactly one of --top-k, --ratio and --all", "for example --top-k 256 or --ratio 0.05"
            )
        if self.top_k is not None and self.top_k < 1:
            raise GradselError(f"--top-k must be at least 1, got {self.top_k}", "for example --top-k 256")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise GradselError(f"--ratio must be in (0, 1], got {self.ratio}", "for example --ratio 0.05")
        lo, hi = self.band
        if not (0 <= lo <= hi <= 1):
            raise GradselError(f"--band {lo},{hi} is outside [0, 1] or reversed", "for example --band 0.2,0.8")
        if self.diverse is not None and not 0 < self.diverse <= 1:
            raise GradselError(
                f"--diverse must be in (0, 1], got {self.diverse}", "1 ranks by score alone; 0.7 is a common trade-off"
            )
        if self.target not in TARGETS:
            raise GradselError(f"unknown --target {self.target!r}", f"use {', '.join(TARGETS)}")
        resolve_kind(self.index, 0)
        if self.balance is not None and self.balance not in BALANCE_COLUMNS:
            raise GradselError(
                f"cannot balance on {self.balance!r}: it is not a column of the scores",
                f"balance on {', '.join(BALANCE_COLUMNS)}",
            )
        if self.balance_weights is not None:
            if not self.balance:
                raise GradselError("--balance-weights needs --balance COLUMN", "for example --balance data_source")
            if any(w < 0 for _, w in self.balance_weights) or not any(w > 0 for _, w in self.balance_weights):
                raise GradselError(
                    "--balance-weights must be non-negative with at least one above zero",
                    "for example gsm8k=0.7,math=0.3",
                )


def parse_weights(text: str) -> tuple[tuple[str, float], ...]:
    """'a=0.7,b=0.3' -> (('a', 0.7), ('b', 0.3))."""
    try:
        pairs = [item.rsplit("=", 1) for item in text.split(",") if item.strip()]
        return tuple((name.strip(), float(weight)) for name, weight in pairs)
    except ValueError as exc:
        raise GradselError(
            f"bad --balance-weights {text!r}", "write GROUP=WEIGHT pairs, for example gsm8k=0.7,math=0.3"
        ) from exc


def parse_band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise GradselError(f"bad --band {text!r}", "write LO,HI, for example 0.2,0.8") from exc
    return lo, hi


@dataclass
class Selection:
    problem_ids: list[str]
    scores: list[float]  # the mode's ranking score, best first
    eligible: int
    config: SelectConfig


# -- reading the store -------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """Scored problems as columns, in store order: what the modes rank. A dict a row would cost
    seconds at a million candidates."""

    ids: list[str]
    pass_rate: np.ndarray
    score_cos: np.ndarray
    score_dot: np.ndarray
    consistency: np.ndarray  # judge_consistency; 1 where a store predates it
    breaks_contract: np.ndarray  # two paid answers under a one-answer judge; False where a store predates it
    zero_advantage: np.ndarray
    groups: dict  # column name -> values, for --balance (BALANCE_COLUMNS)
    rows: np.ndarray  # each candidate's row in the table it was read from

    @classmethod
    def from_table(cls, table) -> "Candidates":
        def floats(name):
            return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

        consistency = (
            np.nan_to_num(floats("judge_consistency"), nan=1.0)
            if "judge_consistency" in table.column_names
            else np.ones(table.num_rows)
        )
        broken = (
            np.asarray(table.column("breaks_contract").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
            if "breaks_contract" in table.column_names
            else np.zeros(table.num_rows, dtype=bool)
        )
        return cls(
            table.column("problem_id").to_pylist(),
            floats("pass_rate"),
            floats("score_cos"),
            floats("score_dot"),
            consistency,
            broken,
            np.asarray(table.column("zero_advantage").to_numpy(zero_copy_only=False), dtype=bool),
            {c: table.column(c).to_pylist() for c in BALANCE_COLUMNS if c in table.column_names},
            np.arange(table.num_rows),
        )

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Candidates":
        import pyarrow as pa

        from gradsel.core.schema import SCORES

        return cls.from_table(pa.Table.from_pylist(rows, schema=SCORES))

    def take(self, positions: np.ndarray) -> "Candidates":
        return Candidates(
            [self.ids[i] for i in positions],
            self.pass_rate[positions],
            self.score_cos[positions],
            self.score_dot[positions],
            self.consistency[positions],
            self.breaks_contract[positions],
            self.zero_advantage[positions],
            {c: [v[i] for i in positions] for c, v in self.groups.items()},
            self.rows[positions],
        )


def load_scores(store) -> tuple[dict, list[dict], Path]:
    """(manifest, the scores table's rows, the features directory) of the store's current scores."""
    manifest, table, directory = load_score_table(store)
    return manifest, table.to_pylist(), directory


def load_score_table(store):
    """(manifest, the scores table (schema.SCORES), the features directory), checked against the
    manifest's projector spec."""
    import pyarrow.parquet as pq

    manifest = store.read_manifest()
    features = manifest.get("features")
    if not features or not (store.root / features / "scores.parquet").is_file():
        raise GradselError(f"store {store.root} has no scores", "run `gradsel score` on it first")
    directory = store.root / features
    feature_spec = json.loads((directory / "spec.json").read_text())["projector"]
    check_same_spec(manifest.get("projector") or {}, feature_spec)
    return manifest, pq.read_table(directory / "scores.parquet"), directory


def check_same_spec(expected: dict, found: dict) -> None:
    """Vectors made under different projector specs must never be compared."""
    differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if differ:
        raise GradselError(
            f"projector spec mismatch in {', '.join(differ)}: the store manifest and the vectors "
            "were made with different settings",
            "rescore with one spec, or select from a store made with it",
        )


# -- ranking -------------------------------------------------------------------------------------


def mode_scores(rows: list[dict], cfg: SelectConfig, train: VectorSet, val: VectorSet, fetch: int) -> dict[str, float]:
    """problem id -> the ranking score of every row under cfg.mode (higher is better)."""
    candidates = Candidates.from_rows(rows)
    return dict(zip(candidates.ids, mode_score_array(candidates, cfg, train, val, fetch).tolist()))


def mode_score_array(c: Candidates, cfg: SelectConfig, train: VectorSet, val: VectorSet, fetch: int) -> np.ndarray:
    """The ranking score of every candidate under cfg.mode (higher is better), in c's order, by
    the mode's record (gradsel.selection.modes). `train` and `val`: the stored vectors, read only by
    the modes and targets that need them. Modes that query the candidate index need at least the
    `fetch` best of each query scored."""
    mode = MODE_RECORDS.get(cfg.mode)
    if mode is None:
        raise GradselError(f"unknown mode {cfg.mode!r}", f"choose one of {', '.join(MODES)}")
    if cfg.target == "max" and mode.honours_target:
        # LESS-style: each candidate's best cosine with any single validation problem.
        best = index_alignment(train, cfg.index, live_validation_vectors(val), fetch)
        base = np.array([best.get(pid, 0.0) for pid in c.ids], dtype=np.float64)
    elif cfg.target == "subspace" and mode.honours_target:
        base = subspace_scores(c.ids, c.rows, train, val)
    else:
        base = c.score_cos
    return np.asarray(mode.score(ModeInputs(c, base, train, fetch, cfg.index, cfg.seed)), dtype=np.float64)


def reads_alignment(cfg: SelectConfig) -> bool:
    """Whether the mode ranks by a stored alignment with the validation gradient (its record's
    alignment_column), as resolved: the modes that honour --target read it under --target mean."""
    mode = MODE_RECORDS[cfg.mode]
    return mode.alignment_column is not None and (not mode.honours_target or cfg.target == "mean")


_WARNED_SKETCH: set[str] = set()  # feature directories warned about in this process: one line per run


def warn_if_sketch_alignment(manifest: dict, cfg: SelectConfig, directory: Path) -> None:
    """One `warning:` line where a mode ranks by score_cos (or score_dot) that the store estimated
    from the sketches (`score --alignment sketch`, the default): the paper's cosine, with the
    sketch's error in it (Spearman 0.85 with the exact cosine on a 160-problem noisy tiny-arith
    pool, docs/benchmarks.md). Once per process and store: `report` selects several modes."""
    if manifest.get("alignment") != "sketch" or not reads_alignment(cfg) or str(directory) in _WARNED_SKETCH:
        return
    _WARNED_SKETCH.add(str(directory))
    spec = manifest.get("projector") or {}
    column = MODE_RECORDS[cfg.mode].alignment_column
    console.warn(
        f"--mode {cfg.mode} ranks by {column}, estimated here from {spec.get('k_out')}x{spec.get('k_in')} "
        "sketches (`score --alignment sketch`); for the one computed in the gradient pass, rescore with "
        "`gradsel score --alignment lowrank`"
        + (" --feature projected" if spec.get("feature") == "head" else "")
        + " (the rollouts are reused)"
    )


def _mmr(ranked: list[str], scores: dict[str, float], k: int, lam: float, train: VectorSet) -> list[str]:
    """Maximal marginal relevance: pick argmax lam * score - (1 - lam) * max cos(chosen)."""
    pos = {pid: i for i, pid in enumerate(train.ids)}
    pool = ranked[: min(len(ranked), max(10 * k, 1000))]  # candidates beyond this never win
    mat = train.take(np.array([pos[p] for p in pool]))
    s = np.array([scores[p] for p in pool], dtype=np.float64)
    if s.max() > s.min():
        s = (s - s.min()) / (s.max() - s.min())  # put relevance on the cosine's scale
    redundancy = np.full(len(pool), -1.0)
    chosen: list[int] = []
    available = np.ones(len(pool), dtype=bool)
    for _ in range(min(k, len(pool))):
        gain = np.where(available, lam * s - (1 - lam) * np.maximum(redundancy, 0), -np.inf)
        j = int(np.argmax(gain))
        chosen.append(j)
        available[j] = False
        redundancy = np.maximum(redundancy, mat @ mat[j])
    return [pool[j] for j in chosen]


def select(store, cfg: SelectConfig) -> Selection:
    import pyarrow.compute as pc

    cfg.validate()
    manifest, table, directory = load_score_table(store)
    cfg = replace(cfg, target=resolve_target(cfg.target, manifest["projector"]["feature"], cfg.mode))
    warn_if_sketch_alignment(manifest, cfg, directory)
    train, val = VectorSet(directory, "train"), VectorSet(directory, "val")  # read only where a mode needs them
    candidates = Candidates.from_table(table.filter(pc.equal(table.column("split"), "train")))
    keep = np.ones(len(candidates.ids), dtype=bool) if cfg.include_zero_advantage else ~candidates.zero_advantage
    if cfg.mode == "band":
        lo, hi = cfg.band
        keep &= (lo <= candidates.pass_rate) & (candidates.pass_rate <= hi)
    eligible = candidates if keep.all() else candidates.take(np.flatnonzero(keep))
    if not eligible.ids:
        raise GradselError(
            "no candidate is eligible: every problem has zero advantage"
            if not cfg.include_zero_advantage
            else "no candidate is eligible",
            "more rollouts per problem (--n), a different pool, or --include-zero-advantage",
        )
    n_candidates = len(candidates.ids)
    wanted = cfg.top_k if cfg.top_k is not None else round((cfg.ratio or 1) * n_candidates)
    # Quotas and score floors reach past the top of the ranking: give them every candidate.
    fetch = n_candidates if cfg.all or cfg.min_score is not None or cfg.balance else max(10 * wanted, 1024)
    scores = mode_score_array(eligible, cfg, train, val, fetch)
    if cfg.min_score is not None:
        above = np.flatnonzero(scores >= cfg.min_score)
        eligible, scores = eligible.take(above), scores[above]
    # Rank: score descending, ties by problem id so the order is deterministic.
    order = (
        np.lexsort((np.array(eligible.ids, dtype=object).astype(str), -scores)) if eligible.ids else np.zeros(0, int)
    )
    k = len(order) if cfg.all else cfg.top_k if cfg.top_k is not None else max(1, round(cfg.ratio * n_candidates))
    if k > len(order):
        if not cfg.allow_fewer:
            raise GradselError(
                f"asked for {k} problems but only {len(order)} are eligible (of {n_candidates} candidates)",
                "ask for fewer, or pass --allow-fewer to take all eligible",
            )
        k = len(order)
    if not cfg.balance and not (cfg.diverse is not None and cfg.diverse < 1):
        return Selection([eligible.ids[i] for i in order[:k]], scores[order[:k]].tolist(), len(order), cfg)
    ranked = [eligible.ids[i] for i in order]
    score_of = dict(zip(ranked, scores[order].tolist()))
    if cfg.balance:
        column = eligible.groups.get(cfg.balance, [""] * len(eligible.ids))
        chosen = _balanced(
            ranked,
            {pid: {cfg.balance: v} for pid, v in zip(eligible.ids, column)},
            cfg.balance,
            k,
            dict(cfg.balance_weights) if cfg.balance_weights else None,
        )
    else:
        chosen = _mmr(ranked, score_of, k, cfg.diverse, train)
    return Selection(chosen, [score_of[p] for p in chosen], len(ranked), cfg)


def _balanced(
    ranked: list[str], rows: dict[str, dict], column: str, k: int, weights: dict[str, float] | None = None
) -> list[str]:
    """Per-group quotas, best first in each group. Quotas follow `weights` (groups not named get
    none) or else the groups' shares of the eligible pool; a group with fewer members than its
    quota gives the rest to the others, in proportion."""
    groups: dict[str, list[str]] = {}
    for pid in ranked:
        groups.setdefault(str(rows[pid].get(column, "")), []).append(pid)
    if weights is not None:
        unknown = sorted(set(weights) - set(groups))
        if unknown:
            raise GradselError(
                f"--balance-weights names {', '.join(unknown)}, not a {column} of any eligible problem",
                f"the eligible groups are {', '.join(sorted(groups))}",
            )
    share = {g: (weights.get(g, 0.0) if weights is not None else len(m)) for g, m in groups.items()}
    quota = dict.fromkeys(groups, 0)
    active = {g for g in groups if share[g] > 0}
    left = min(k, sum(len(groups[g]) for g in active))
    while active:  # largest remainder; a group that cannot fill its quota is capped and the rest re-shared
        total = sum(share[g] for g in active)
        exact = {g: left * share[g] / total for g in active}
        q = {g: int(v) for g, v in exact.items()}
        for g in sorted(active, key=lambda g: (-(exact[g] - q[g]), g))[: left - sum(q.values())]:
            q[g] += 1
        full = {g for g in active if q[g] >= len(groups[g])}
        if all(q[g] <= len(groups[g]) for g in active):
            quota |= q
            break
        for g in full:
            quota[g] = len(groups[g])
            left -= quota[g]
        active -= full
    keep = {pid for g, members in groups.items() for pid in members[: quota[g]]}
    return [pid for pid in ranked if pid in keep]
