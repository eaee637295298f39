"""Rounds: score the pool chunk by chunk as the policy trains (`score --chunk-size`, `refresh`).

Layout of a store with rounds:

    STORE/
      manifest.json               run config, pool order, the round lineage
      history.parquet             schema.HISTORY: round, problem, checkpoint, score, selected
      rounds/round-000/           a complete store of its own (manifest, rollouts, features)
        chunk.parquet|jsonl       the chunk's original rows, unchanged
        selection.json            the ids selected from this round
      rounds/round-001/ ...

The pool order is fixed once, seeded, when the store is created. Each round takes the next
`chunk_size` problems that have not been offered yet; with `--reuse-unselected`, problems
offered but not selected go back to the end of the queue. A selected problem is never offered
again.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, fields
from pathlib import Path

from gradsel.core import console
from gradsel.core.errors import GradselError
from gradsel.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_table
from gradsel.gradients.stage import ScoreConfig
from gradsel.inputs.models import resolve_model_path
from gradsel.inputs.problems import is_jsonl, original_rows, read_problems
from gradsel.pipeline.score import RolloutOptions, ScoreResult, run_score
from gradsel.store.directory import FORMAT_VERSION, Store, open_store


def round_dir(root: Path, index: int) -> Path:
    return root / "rounds" / f"round-{index:03d}"


def pool_order(problem_ids: list[str], seed: int) -> list[str]:
    order = sorted(problem_ids)
    random.Random(f"gradsel-pool-order/{seed}").shuffle(order)
    return order


def write_chunk(pool_path: Path, source_rows: list[int], dest_dir: Path) -> Path:
    """The chunk's rows exactly as they are in the pool file (same format), taken by source_row
    as a selection takes them (problems.original_rows)."""
    rows = original_rows(pool_path, source_rows)
    if is_jsonl(pool_path):
        dest = dest_dir / "chunk.jsonl"
        atomic_write_bytes(dest, b"".join(line + b"\n" for line in rows))
    else:
        dest = dest_dir / "chunk.parquet"
        atomic_write_table(dest, rows)
    return dest


def round_selection(root: Path, entry: dict) -> list[str] | None:
    """The ids `select` took from a round, or None before it ran. `select` is a reader: it records
    its choice in the round's own selection.json, never in the manifest a writer may be updating."""
    path = round_dir(Path(root), entry["round"]) / "selection.json"
    if path.is_file():
        return json.loads(path.read_text())["selected_ids"]
    return entry.get("selected_ids")  # stores written before selection.json


def _next_chunk(root: Path, manifest: dict, chunk_size: int | None, reuse_unselected: bool) -> list[str]:
    order = manifest["pool_order"]
    selected = {pid for r in manifest["rounds"] for pid in round_selection(root, r) or []}
    offered = [pid for r in manifest["rounds"] for pid in r["chunk_ids"]]
    seen = set(offered)
    queue = [pid for pid in order if pid not in seen]
    if reuse_unselected:  # offered but never selected: back at the end, oldest first
        queue += [pid for pid in dict.fromkeys(offered) if pid not in selected]
    queue = [pid for pid in dict.fromkeys(queue) if pid not in selected]
    size = chunk_size or manifest["chunk_size"] or len(order)
    return queue[:size]


def _score_round(root: Path, index: int, *, model: str, chunk_ids: list[str], run: dict) -> ScoreResult:
    pool_path = Path(run["pool"])
    problems = {
        p.problem_id: p
        for p in read_problems(
            pool_path, prompt_key=run["ro"]["prompt_key"], answer_key=run["ro"]["answer_key"]
        ).problems
    }
    directory = round_dir(root, index)
    directory.mkdir(parents=True, exist_ok=True)
    chunk = write_chunk(pool_path, [problems[pid].source_row for pid in chunk_ids], directory)
    ro = RolloutOptions(**run["ro"])
    # Stores written before the feature shards followed the rollout shards recorded a shard_size.
    known = {f.name for f in fields(ScoreConfig)}
    sc = ScoreConfig(**{k: v for k, v in run["sc"].items() if k in known} | {"sketch": tuple(run["sc"]["sketch"])})
    return run_score(directory, model=model, pool=chunk, val=Path(run["val"]), ro=ro, sc=sc)


def start_rounds(
    store_dir: Path,
    *,
    model: str,
    pool: Path,
    val: Path,
    ro: RolloutOptions,
    sc: ScoreConfig,
    chunk_size: int,
    order_seed: int = 0,
) -> ScoreResult:
    """`score --chunk-size M`: fix the pool order and score round 0 (its first chunk)."""
    store = open_store(store_dir)
    manifest = _read_top(store)
    ids = [p.problem_id for p in read_problems(pool, prompt_key=ro.prompt_key, answer_key=ro.answer_key).problems]
    if chunk_size > len(ids):
        raise GradselError(
            f"--chunk-size {chunk_size} is larger than the pool ({len(ids)} problems)",
            "use a smaller chunk, or leave --chunk-size out to score the whole pool at once",
        )
    if not manifest:
        manifest = {
            "format_version": FORMAT_VERSION,
            "rounds_store": True,
            "run": {
                "pool": str(Path(pool).resolve()),
                "val": str(Path(val).resolve()),
                "ro": asdict(ro),
                "sc": asdict(sc),
            },
            "chunk_size": chunk_size,
            "pool_order": pool_order(ids, order_seed),
            "rounds": [],
        }
        atomic_write_json(store.manifest_path, manifest)
    elif manifest["rounds"]:
        last = manifest["rounds"][-1]
        return _resume_round(store_dir, manifest, last["round"], model)
    chunk_ids = _next_chunk(Path(store_dir), manifest, chunk_size, False)
    return _finish_round(store_dir, manifest, 0, model, chunk_ids)


def _resume_round(store_dir: Path, manifest: dict, index: int, model: str) -> ScoreResult:
    """Finish a round a killed run left without its checkpoint: the same chunk and model, then
    the checkpoint recorded as for a round that ran straight through."""
    entry = manifest["rounds"][index]
    return _finish_round(store_dir, manifest, index, model, entry["chunk_ids"])


def _finish_round(store_dir: Path, manifest: dict, index: int, model: str, chunk_ids: list[str]) -> ScoreResult:
    # Record the round before the work, so a killed run resumes the same chunk.
    entry = {"round": index, "dir": f"rounds/round-{index:03d}", "chunk_ids": chunk_ids, "model": str(model)}
    manifest["rounds"] = manifest["rounds"][:index] + [entry]
    atomic_write_json(Path(store_dir) / "manifest.json", manifest)
    result = _score_round(store_dir, index, model=model, chunk_ids=chunk_ids, run=manifest["run"])
    sub = Store(round_dir(Path(store_dir), index)).read_manifest()
    entry["checkpoint"] = sub["snapshot"]["content_hash"]
    entry["checkpoint_path"] = sub["snapshot"]["source_path"]
    atomic_write_json(Path(store_dir) / "manifest.json", manifest)
    return result


def refresh(
    store_dir: Path,
    *,
    model: str,
    chunk_size: int | None = None,
    reuse_unselected: bool = False,
    force: bool = False,
    restart_round: bool = False,
) -> tuple[int, ScoreResult]:
    """Snapshot the new checkpoint, roll out and score the next chunk and the validation set.

    A round that a failed or killed refresh left incomplete is finished with the checkpoint it
    was started with (rerun with that --model), or dropped with `restart_round` and its chunk
    scored again with the new checkpoint. Nothing asked for is ignored in silence."""
    import shutil

    from gradsel.inputs.snapshot import take_snapshot

    store = Store(Path(store_dir))
    manifest = _read_top(store)
    if not manifest or not manifest.get("rounds_store"):
        raise GradselError(
            f"{store_dir} is not a store with rounds", "create one with `gradsel score --chunk-size M ...`"
        )
    last = manifest["rounds"][-1]
    if "checkpoint" not in last and restart_round:
        console.info(f"round {last['round']} is incomplete; dropping it and scoring its chunk with {model}")
        shutil.rmtree(round_dir(Path(store_dir), last["round"]), ignore_errors=True)
        manifest["rounds"].pop()
        atomic_write_json(store.manifest_path, manifest)
        if not manifest["rounds"]:  # round 0 itself: score its chunk again
            return 0, _finish_round(store_dir, manifest, 0, model, last["chunk_ids"])
        last = manifest["rounds"][-1]
    elif restart_round:
        raise GradselError(
            f"round {last['round']} is complete: --restart-round has nothing to restart",
            "leave --restart-round out to score the next round",
        )
    if "checkpoint" not in last:  # the last round never finished
        started = last["model"]
        if resolve_model_path(model) != resolve_model_path(started):
            raise GradselError(
                f"round {last['round']} is incomplete: it was started with {started}, not {model}",
                f"rerun with --model {started} to finish it, or add --restart-round to drop it "
                f"and score its chunk with {model}",
            )
        if chunk_size is not None or reuse_unselected:
            raise GradselError(
                f"round {last['round']} is incomplete; --chunk-size and --reuse-unselected apply to a new round",
                "rerun without them to finish this round, or add --restart-round",
            )
        console.info(f"round {last['round']} is incomplete; finishing it with {started}")
        return last["round"], _resume_round(store_dir, manifest, last["round"], started)
    mode = manifest["run"]["ro"]["hash_mode"]
    new_hash = take_snapshot(model, mode=mode).content_hash
    if round_selection(Path(store_dir), last) is None:
        if new_hash == last["checkpoint"]:  # a rerun of the refresh that made it (killed as it ended)
            console.info(f"round {last['round']} is already complete for this checkpoint")
            return last["round"], _resume_round(store_dir, manifest, last["round"], model)
        raise GradselError(
            f"round {last['round']} has no selection yet, so the next chunk cannot be chosen",
            f"run `gradsel select --store {store_dir} --top-k K --out FILE` for round {last['round']} "
            "first (a selection inside refresh applies to the round it scores)",
        )
    _check_vocabulary(Path(store_dir), manifest, model)
    if new_hash == last["checkpoint"] and not force:
        raise GradselError(
            f"checkpoint {model} is identical to round {last['round']}'s ({new_hash[:19]})",
            "pass the new checkpoint after training, or --force to rescore the same one",
        )
    chunk_ids = _next_chunk(Path(store_dir), manifest, chunk_size, reuse_unselected)
    if not chunk_ids:
        raise GradselError(
            "no problems left to offer: every pool problem was offered in an earlier round",
            "pass --reuse-unselected to offer unselected problems again",
        )
    index = last["round"] + 1
    return index, _finish_round(store_dir, manifest, index, model, chunk_ids)


def _check_vocabulary(root: Path, manifest: dict, model: str) -> None:
    """Refuse a checkpoint whose tokenizer maps tokens to other ids than round 0's: the store's
    rollouts, chunks and history are token ids, which would then mean other tokens."""
    from gradsel.inputs.models import vocabulary_digest

    first = Store(round_dir(root, manifest["rounds"][0]["round"])).read_manifest().get("vocabulary")
    if first is None:  # a store written before vocabularies were recorded
        return
    if vocabulary_digest(model) != first:
        raise GradselError(
            f"checkpoint {model} has a different vocabulary from this store's round 0",
            "its token ids would mean other tokens: score it into a new store (`gradsel score --chunk-size M ...`)",
        )


def select_emit_record(store_dir: Path, round_store: Path, cfg, *, fmt: str, out: str, annotate: bool, force: bool):
    """Select from a round's store (or a plain store), write the subset, and record the choice
    for `refresh`: what `select` and `refresh` both do. Returns (Selection, rows written)."""
    from gradsel.selection.formats import write_selection
    from gradsel.selection.select import select

    st = Store(Path(round_store))
    selection = select(st, cfg)
    written = write_selection(st, selection, fmt=fmt, out=out, annotate=annotate, force=force)
    record_selection(store_dir, round_store, selection.problem_ids)
    return selection, written


def record_selection(store_dir: Path, round_store: Path, selected_ids: list[str]) -> None:
    """Remember which problems a round's selection took (selection.json) and update the history."""
    import errno

    store_dir, round_store = Path(store_dir).resolve(), Path(round_store).resolve()
    if round_store == store_dir:  # a store without rounds
        return
    try:
        atomic_write_json(round_store / "selection.json", {"selected_ids": list(selected_ids)})
        write_history(store_dir, _read_top(Store(store_dir)))
    except OSError as exc:  # a read-only store still selects (docs/store.md); the output is written
        if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
            raise
        console.warn(
            f"the store is read-only: this selection is not recorded in {round_store.name} "
            "(`refresh` needs a recorded selection of the latest round)"
        )


def write_history(root: Path, manifest: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsel.core.schema import HISTORY

    rows = []
    for entry in manifest["rounds"]:
        sub = Store(round_dir(root, entry["round"]))
        features = sub.read_manifest().get("features")
        if not features:
            continue
        selected = set(round_selection(root, entry) or [])
        for r in pq.read_table(sub.root / features / "scores.parquet").to_pylist():
            if r["split"] == "train":
                rows.append(
                    {
                        "round": entry["round"],
                        "problem_id": r["problem_id"],
                        "checkpoint": entry.get("checkpoint", ""),
                        "score_cos": r["score_cos"],
                        "pass_rate": r["pass_rate"],
                        "selected": r["problem_id"] in selected,
                    }
                )
    atomic_write_table(root / "history.parquet", pa.Table.from_pylist(rows, schema=HISTORY))


def latest_round_store(root: Path) -> Path:
    """Where `select` and `info` look: the latest complete round of a rounds store (a round that
    `refresh` is still writing is never read), else the store itself."""
    manifest = Store(Path(root)).read_manifest()
    rounds = manifest.get("rounds") if manifest.get("rounds_store") else None
    if rounds:
        complete = [r for r in rounds if "checkpoint" in r]
        return round_dir(Path(root), (complete or rounds)[-1]["round"])
    return Path(root)


def _read_top(store: Store) -> dict:
    return store.read_manifest()
