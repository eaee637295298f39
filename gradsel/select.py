"""Selection: rank the scored candidates by a mode, filter, and emit the original rows.

Modes (the paper's method and its baselines):
  gradalign   cosine with the validation gradient (default)
  dot         inner product with the validation gradient
  accgreedy   pass rate closest to 0.5 first
  band        pass rate in [lo, hi], in seeded random order
  simacc      cosine * 4 * acc * (1 - acc)
  learnalign  cosine with the mean candidate gradient (no validation set)
  random      seeded random order
  reliable    gradalign minus 2 * (1 - judge_consistency): problems whose judge gave identical
              answers different rewards sink (gradsel's addition; docs/quality.md)
Zero-advantage problems (every reward equal) carry no GRPO signal and are left out unless asked.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gradsel import console
from gradsel.errors import GradselError

MODES = ("gradalign", "dot", "accgreedy", "band", "simacc", "learnalign", "random", "reliable")
FORMATS = ("verl", "jsonl", "openrlhf", "ids")
VECTOR_MODES = ("learnalign",)  # modes that need the stored vectors


@dataclass(frozen=True)
class SelectConfig:
    mode: str = "gradalign"
    top_k: int | None = None
    ratio: float | None = None
    all: bool = False
    band: tuple[float, float] = (0.0, 1.0)
    min_score: float | None = None
    include_zero_advantage: bool = False
    balance: str | None = None  # a column of the scores table, e.g. data_source
    diverse: float | None = None  # MMR trade-off in (0, 1]; 1 = score only
    target: str = "mean"  # mean: the validation direction; max: best single validation problem
    seed: int = 0
    allow_fewer: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise GradselError(f"unknown mode {self.mode!r}", f"choose one of {', '.join(MODES)}")
        if sum(x is not None and x is not False for x in (self.top_k, self.ratio, self.all or None)) != 1:
            raise GradselError("give exactly one of --top-k, --ratio and --all", "for example --top-k 256 or --ratio 0.05")
        if self.top_k is not None and self.top_k < 1:
            raise GradselError(f"--top-k must be at least 1, got {self.top_k}", "for example --top-k 256")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise GradselError(f"--ratio must be in (0, 1], got {self.ratio}", "for example --ratio 0.05")
        lo, hi = self.band
        if not (0 <= lo <= hi <= 1):
            raise GradselError(f"--band {lo},{hi} is outside [0, 1] or reversed", "for example --band 0.2,0.8")
        if self.diverse is not None and not 0 < self.diverse <= 1:
            raise GradselError(f"--diverse must be in (0, 1], got {self.diverse}", "1 ranks by score alone; 0.7 is a common trade-off")
        if self.target not in ("mean", "max"):
            raise GradselError(f"unknown --target {self.target!r}", "use mean or max")


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

def load_scores(store) -> tuple[dict, list[dict], Path]:
    import pyarrow.parquet as pq

    manifest = store.read_manifest()
    features = manifest.get("features")
    if not features or not (store.root / features / "scores.parquet").is_file():
        raise GradselError(f"store {store.root} has no scores", "run `gradsel score` on it first")
    directory = store.root / features
    feature_spec = json.loads((directory / "spec.json").read_text())["projector"]
    check_same_spec(manifest.get("projector") or {}, feature_spec)
    rows = pq.read_table(directory / "scores.parquet").to_pylist()
    return manifest, rows, directory


def check_same_spec(expected: dict, found: dict) -> None:
    """Vectors made under different projector specs must never be compared."""
    differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if differ:
        raise GradselError(f"projector spec mismatch in {', '.join(differ)}: the store manifest and the vectors "
                           "were made with different settings", "rescore with one spec, or select from a store made with it")


def load_vectors(directory: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(ids, unit vectors as float32), read memory-mapped from the Parquet shards."""
    import pyarrow.parquet as pq

    shards = sorted((directory / split).glob("shard-*.parquet"))
    if not shards:
        raise GradselError(f"{directory} holds no {split} vectors (the exact feature stores none)",
                           "score with --feature projected or head for vector-based modes")
    ids, parts = [], []
    for shard in shards:
        t = pq.read_table(shard, memory_map=True, columns=["problem_id", "vector"])
        dim = t.schema.field("vector").type.list_size
        ids += t.column("problem_id").to_pylist()
        flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        parts.append(flat.reshape(t.num_rows, dim))
    return ids, np.concatenate(parts).astype(np.float32)


# -- FAISS ---------------------------------------------------------------------------------------

def faiss_module():
    try:
        import faiss
    except ImportError as exc:
        raise GradselError("FAISS is not installed", "pip install 'gradsel[cpu]' (faiss-cpu) or 'gradsel[gpu]' (faiss-gpu)") from exc
    return faiss


# -- ranking -------------------------------------------------------------------------------------

def mode_scores(rows: list[dict], cfg: SelectConfig, directory: Path) -> dict[str, float]:
    """The ranking score of every candidate under cfg.mode (higher is better)."""
    rng = random.Random(f"gradsel-select/{cfg.seed}")
    if cfg.target == "max" and cfg.mode in ("gradalign", "simacc"):
        best = _max_val_alignment(directory)
        base = {r["problem_id"]: best.get(r["problem_id"], 0.0) for r in rows}
    else:
        base = {r["problem_id"]: r["score_cos"] for r in rows}
    if cfg.mode == "gradalign":
        return base
    if cfg.mode == "reliable":
        return {r["problem_id"]: base[r["problem_id"]] - 2 * (1 - _consistency(r)) for r in rows}
    if cfg.mode == "dot":
        return {r["problem_id"]: r["score_dot"] for r in rows}
    if cfg.mode == "accgreedy":
        return {r["problem_id"]: -abs(r["pass_rate"] - 0.5) for r in rows}
    if cfg.mode == "simacc":
        return {r["problem_id"]: base[r["problem_id"]] * 4 * r["pass_rate"] * (1 - r["pass_rate"]) for r in rows}
    if cfg.mode in ("band", "random"):
        ids = sorted(r["problem_id"] for r in rows)
        rng.shuffle(ids)
        return {pid: -i for i, pid in enumerate(ids)}
    if cfg.mode == "learnalign":
        # Every candidate against one direction: an exact matrix-vector product beats any index.
        ids, vecs = load_vectors(directory, "train")
        live = np.linalg.norm(vecs, axis=1) > 0
        mean = vecs[live].mean(axis=0)
        mean /= max(np.linalg.norm(mean), 1e-30)
        found = dict(zip(ids, (vecs @ mean).tolist()))
        return {r["problem_id"]: found[r["problem_id"]] for r in rows}
    raise GradselError(f"unknown mode {cfg.mode!r}", f"choose one of {', '.join(MODES)}")


def _consistency(row: dict) -> float:
    value = row.get("judge_consistency")
    return 1.0 if value is None else value


def _max_val_alignment(directory: Path) -> dict[str, float]:
    """LESS-style: each candidate's best cosine with any single validation problem."""
    faiss = faiss_module()
    val_ids, val_vecs = load_vectors(directory, "val")
    val_vecs = val_vecs[np.linalg.norm(val_vecs, axis=1) > 0]
    index = faiss.IndexFlatIP(val_vecs.shape[1])
    index.add(val_vecs)
    ids, vecs = load_vectors(directory, "train")
    sims, _ = index.search(vecs, 1)
    return {pid: float(s) for pid, s in zip(ids, sims[:, 0])}


def _mmr(ranked: list[str], scores: dict[str, float], k: int, lam: float, directory: Path) -> list[str]:
    """Maximal marginal relevance: pick argmax lam * score - (1 - lam) * max cos(chosen)."""
    ids, vecs = load_vectors(directory, "train")
    pos = {pid: i for i, pid in enumerate(ids)}
    pool = ranked[:min(len(ranked), max(10 * k, 1000))]  # candidates beyond this never win
    mat = vecs[[pos[p] for p in pool]]
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
    cfg.validate()
    _, rows, directory = load_scores(store)
    candidates = [r for r in rows if r["split"] == "train"]
    eligible = [r for r in candidates if cfg.include_zero_advantage or not r["zero_advantage"]]
    if cfg.mode == "band":
        lo, hi = cfg.band
        eligible = [r for r in eligible if lo <= r["pass_rate"] <= hi]
    if not eligible:
        raise GradselError("no candidate is eligible: every problem has zero advantage"
                           if not cfg.include_zero_advantage else "no candidate is eligible",
                           "more rollouts per problem (--n), a different pool, or --include-zero-advantage")
    scores = mode_scores(eligible, cfg, directory)
    if cfg.min_score is not None:
        eligible = [r for r in eligible if scores[r["problem_id"]] >= cfg.min_score]
    # Rank: score descending, ties by problem id so the order is deterministic.
    ids = [r["problem_id"] for r in eligible]
    order = np.lexsort((np.array(ids), -np.array([scores[p] for p in ids], dtype=np.float64)))
    ranked = [ids[i] for i in order]
    k = len(ranked) if cfg.all else cfg.top_k if cfg.top_k is not None else max(1, round(cfg.ratio * len(candidates)))
    if k > len(ranked):
        if not cfg.allow_fewer:
            raise GradselError(f"asked for {k} problems but only {len(ranked)} are eligible "
                               f"(of {len(candidates)} candidates)", "ask for fewer, or pass --allow-fewer to take all eligible")
        k = len(ranked)
    if cfg.balance:
        chosen = _balanced(ranked, {r["problem_id"]: r for r in eligible}, cfg.balance, k)
    elif cfg.diverse is not None and cfg.diverse < 1:
        chosen = _mmr(ranked, scores, k, cfg.diverse, directory)
    else:
        chosen = ranked[:k]
    return Selection(chosen, [scores[p] for p in chosen], len(ranked), cfg)


def _balanced(ranked: list[str], rows: dict[str, dict], column: str, k: int) -> list[str]:
    """Per-group quotas proportional to the eligible pool (largest remainder), best first in each."""
    groups: dict[str, list[str]] = {}
    for pid in ranked:
        groups.setdefault(str(rows[pid].get(column, "")), []).append(pid)
    total = len(ranked)
    exact = {g: k * len(m) / total for g, m in groups.items()}
    quota = {g: int(v) for g, v in exact.items()}
    for g in sorted(groups, key=lambda g: (-(exact[g] - quota[g]), g))[:k - sum(quota.values())]:
        quota[g] += 1
    keep = {pid for g, members in groups.items() for pid in members[:quota[g]]}
    return [pid for pid in ranked if pid in keep]


# -- output --------------------------------------------------------------------------------------

def write_selection(store, selection: Selection, *, fmt: str, out: str, annotate: bool, force: bool) -> int:
    """Emit the selected rows, unchanged, in rank order; returns the number written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise GradselError(f"unknown --format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    manifest = store.read_manifest()
    to_stdout = out == "-"
    out_path = None if to_stdout else Path(out)
    if out_path is not None and out_path.exists() and not force:
        raise GradselError(f"{out_path} exists", "pass --force to overwrite it, or choose another --out")
    source = _source_file(store, manifest)
    # Only the selected problems' rows become Python objects (a pool can hold millions).
    problems = pq.read_table(store.root / "rollouts/train/problems.parquet",
                             columns=["problem_id", "source_row", "prompt_messages_json", "ground_truth"])
    position = {pid: i for i, pid in enumerate(problems.column("problem_id").to_pylist())}
    picked = problems.take(pa.array([position[pid] for pid in selection.problem_ids], pa.int64())).to_pylist()
    by_id = {p["problem_id"]: p for p in picked}
    rows_idx = [by_id[pid]["source_row"] for pid in selection.problem_ids]
    rank_extra = [{"gradsel_rank": i + 1, "gradsel_score": float(s), "gradsel_mode": selection.config.mode}
                  for i, s in enumerate(selection.scores)]

    if fmt == "ids":
        payload = "".join(pid + "\n" for pid in selection.problem_ids).encode()
    elif fmt == "openrlhf":
        payload = "".join(json.dumps({"input": json.loads(by_id[pid]["prompt_messages_json"]),
                                      "label": by_id[pid]["ground_truth"], **(extra if annotate else {})}) + "\n"
                          for pid, extra in zip(selection.problem_ids, rank_extra)).encode()
    elif source.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        lines = source.read_bytes().splitlines()
        nonblank = [ln for ln in lines if ln.strip()]
        if fmt == "jsonl":
            payload = b"".join(_annotated_line(nonblank[i], e, annotate) + b"\n" for i, e in zip(rows_idx, rank_extra))
        else:
            table = pa.Table.from_pylist([json.loads(nonblank[i]) | (e if annotate else {}) for i, e in zip(rows_idx, rank_extra)])
            payload = _parquet_bytes(table)
    else:
        table = pq.read_table(source).take(pa.array(rows_idx, pa.int64()))
        if annotate:
            for name in ("gradsel_rank", "gradsel_score", "gradsel_mode"):
                table = table.append_column(name, pa.array([e[name] for e in rank_extra]))
        if fmt == "verl":
            payload = _parquet_bytes(table)
        else:
            payload = "".join(json.dumps(r, default=str) + "\n" for r in table.to_pylist()).encode()

    if to_stdout:
        stream = console.data_out()
        stream.flush()
        stream.buffer.write(payload)
        stream.buffer.flush()
    else:
        from gradsel.fsutil import atomic_write_bytes, atomic_write_json

        atomic_write_bytes(out_path, payload)
        atomic_write_json(out_path.with_name(out_path.name + ".gradsel.json"), {
            "mode": selection.config.mode, "config": asdict(selection.config), "format": fmt,
            "selected": len(selection.problem_ids), "eligible": selection.eligible,
            "store": str(store.root), "projector": manifest.get("projector"),
            "checkpoint": (manifest.get("snapshot") or {}).get("content_hash"),
            "problems_file": str(source)})
    return len(selection.problem_ids)


def _annotated_line(line: bytes, extra: dict, annotate: bool) -> bytes:
    if not annotate:
        return line  # byte for byte as it came in
    return json.dumps(json.loads(line) | extra).encode()


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _source_file(store, manifest: dict) -> Path:
    """The candidates' original file, checked against the hash recorded when it was read."""
    import hashlib

    info = (manifest.get("rollouts") or {}).get("train")
    if not info:
        raise GradselError(f"store {store.root} has no candidate rollouts", "run `gradsel score` first")
    path = Path(info["problems_file"])
    if not path.is_file():
        raise GradselError(f"the pool file {path} is gone", "restore it: selection emits its original rows")
    if hashlib.sha256(path.read_bytes()).hexdigest() != info["problems_sha256"]:
        raise GradselError(f"the pool file {path} changed since it was scored",
                           "restore the scored version, or rescore into a new store")
    return path
