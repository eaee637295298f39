"""verl: a relaunch onto the next round's selection that resumes the checkpoint but not the old file's
dataloader position (`gradsel handoff verl`).

What verl does (verl/trainer/ppo/ray_trainer.py and verl/utils/checkpoint/checkpoint_manager.py,
checked in verl 0.8.0.dev and the 0.9.1 release):
- `_save_checkpoint` writes `trainer.default_local_dir/global_step_{N}/actor/` (and `critic/`),
  the train dataloader's state (a torchdata StatefulDataLoader) to `global_step_{N}/data.pt`, and
  then `latest_checkpointed_iteration.txt` holding N (skipped under async_save).
- `trainer.resume_mode=auto` finds the latest checkpoint through that tracker file
  (`find_latest_ckpt_path`), sets global_steps = N and loads actor, critic and `data.pt`, even
  when `data.train_files` changed: the new file is then read from the old file's sampler
  position. (0.9.1 skips the restore only when N is a multiple of the *new* dataloader's length.)
  Without `data.pt` it prints "No dataloader state found ..., will start from scratch".
- Steps per epoch = len(train dataloader) = rows // batch (drop_last=True; batch is
  `data.gen_batch_size` if set, else `data.train_batch_size`). `fit` starts at epoch N // steps
  and stops at step `trainer.total_training_steps`, else steps * `trainer.total_epochs`.

So the hand-off moves `data.pt` aside (renamed, kept) and names both limits, so that the resumed
run reads the new file from its beginning for exactly `epochs` passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gradsel.core.errors import GradselError
from gradsel.integrations import recorded_selection

TRACKER = "latest_checkpointed_iteration.txt"  # verl's get_checkpoint_tracker_filename


@dataclass(frozen=True)
class Handoff:
    parquet: Path
    rows: int
    round: int
    checkpoint: Path  # global_step_N
    global_step: int
    steps_per_epoch: int
    total_epochs: int
    total_training_steps: int
    moved_state: Path | None  # where this hand-off moved the stale data.pt (None: it moved none)
    moved_before: Path | None  # where an earlier hand-off of this round had moved it
    overrides: list[str]


def latest_checkpoint(checkpoints: Path) -> tuple[Path, int]:
    """The checkpoint `trainer.resume_mode=auto` resumes, found as verl finds it."""
    if not checkpoints.is_dir():
        raise GradselError(
            f"--checkpoints {checkpoints} is not a directory",
            "pass the trainer.default_local_dir of the verl run to resume",
        )
    tracker = checkpoints / TRACKER
    if not tracker.is_file():
        found = sorted(p.name for p in checkpoints.glob("global_step_*"))
        raise GradselError(
            f"{checkpoints} has no {TRACKER}: verl's resume_mode=auto would start from scratch"
            + (f" (it holds {', '.join(found[-3:])})" if found else ""),
            "pass the trainer.default_local_dir of a verl run that saved a checkpoint "
            "(trainer.save_freq); an async_save run writes no tracker",
        )
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise GradselError(
            f"{tracker} holds {text[:40]!r}, not a step number", "verl writes the step of the latest checkpoint there"
        )
    step = int(text)
    folder = checkpoints / f"global_step_{step}"
    if not folder.is_dir():
        raise GradselError(
            f"{tracker} names step {step}, but {folder.name} is missing",
            "verl would start from scratch: restore the checkpoint or the tracker",
        )
    return folder, step


def prepare_relaunch(
    store: Path, checkpoints: Path, out: Path | None, *, train_batch_size: int, epochs: int = 1, force: bool = False
) -> Handoff:
    """Write the latest round's selection as verl Parquet, move the checkpoint's stale dataloader
    state aside, and return the launcher's overrides. Everything is checked before anything is
    written; the Parquet is written before the state moves."""
    from gradsel.pipeline.rounds import round_dir
    from gradsel.selection.formats import check_out_path, write_selection
    from gradsel.selection.select import SelectConfig, Selection
    from gradsel.store.directory import Store

    if train_batch_size < 1 or epochs < 1:
        raise GradselError(
            "--train-batch-size and --epochs must be at least 1", "for example --train-batch-size 256 --epochs 1"
        )
    selection = recorded_selection(store)
    folder, step = latest_checkpoint(Path(checkpoints))
    rows = len(selection.problem_ids)
    steps_per_epoch = rows // train_batch_size
    if steps_per_epoch == 0:
        raise GradselError(
            f"round {selection.round}'s selection has {rows} problems, fewer than one batch of "
            f"{train_batch_size}: verl drops an incomplete batch and would train on none",
            "select more problems (--top-k), or pass the smaller data.train_batch_size you launch with",
        )
    out = Path(out) if out is not None else Path(checkpoints) / f"gradsel-round-{selection.round:03d}.parquet"
    check_out_path(str(out), force)
    stale, moved = folder / "data.pt", folder / f"data.pt.stale-before-round-{selection.round:03d}"
    if stale.exists() and moved.exists():
        raise GradselError(
            f"{folder.name} holds both data.pt and {moved.name}",
            "verl saved this step again after an earlier hand-off: move one of them away yourself",
        )

    round_store = Store(round_dir(Path(store), selection.round))
    # The recorded ids, in their rank order, through select's own writer. The selection's mode
    # was not recorded, so the sidecar says where the ids came from instead of a mode.
    write_selection(
        round_store,
        Selection(selection.problem_ids, [float("nan")] * rows, rows, SelectConfig(all=True)),
        fmt="verl",
        out=str(out),
        annotate=False,
        force=True,
    )
    sidecar = out.with_name(out.name + ".gradsel.json")
    from gradsel.core.fsutil import atomic_write_json

    atomic_write_json(
        sidecar,
        json.loads(sidecar.read_text())
        | {
            "mode": None,
            "config": None,
            "recorded_selection": str(selection.path),
            "round": selection.round,
            "handoff": {"trainer": "verl", "checkpoint": str(folder), "global_step": step},
        },
    )
    moved_before = moved if moved.exists() else None
    if stale.exists():
        stale.rename(moved)
    total_epochs = step // steps_per_epoch + epochs
    total_steps = step + epochs * steps_per_epoch
    overrides = [
        f"data.train_files={out.resolve()}",
        "trainer.resume_mode=auto",
        f"trainer.default_local_dir={Path(checkpoints).resolve()}",
        f"trainer.total_epochs={total_epochs}",
        f"trainer.total_training_steps={total_steps}",
    ]
    return Handoff(
        out,
        rows,
        selection.round,
        folder,
        step,
        steps_per_epoch,
        total_epochs,
        total_steps,
        None if moved_before else moved if moved.exists() else None,
        moved_before,
        overrides,
    )


# -- the ranking file of verl's V1 custom sampler (gradsel/integrations/verl_sampler.py) ---------------

# Read by verl_sampler.GradselReplayBuffer; written whole (atomic rename), so a trainer that re-reads
# it on a new mtime never sees half a file.
RANKING_COLUMNS = ("problem_id", "round", "zero_advantage", "judge_reliability", "suspect_key", "selected_rank")


def ranking_rows(store: Path, audit: Path | None = None) -> list[dict]:
    """One row per problem a round of the store scored, from the latest round that scored it: its
    zero advantage and judge reliability there (modes's `judge_reliability`: 0 where it broke the
    judge's contract), whether `gradsel audit --out` (the file `audit`) lists its key as a suspect,
    and its rank in the latest recorded selection (None where not selected)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gradsel.pipeline.rounds import round_dir
    from gradsel.selection.modes import judge_reliability
    from gradsel.selection.select import Candidates
    from gradsel.store.directory import Store, existing_store

    manifest = existing_store(store).read_manifest()
    if not manifest.get("rounds_store"):
        raise GradselError(f"{store} is a store without rounds", "create it with `gradsel score --chunk-size M ...`")
    suspects = _audit_suspects(audit) if audit is not None else set()
    latest: dict[str, dict] = {}
    for entry in (r for r in manifest["rounds"] if "checkpoint" in r):  # a round still being written is not read
        sub = Store(round_dir(Path(store), entry["round"]))
        features = sub.read_manifest().get("features")
        if not features:
            continue
        table = pq.read_table(sub.root / features / "scores.parquet")
        c = Candidates.from_table(table.filter(pc.equal(table.column("split"), "train")))
        for pid, zero, reliability in zip(c.ids, c.zero_advantage.tolist(), judge_reliability(c).tolist()):
            latest[pid] = {
                "problem_id": pid,
                "round": entry["round"],
                "zero_advantage": bool(zero),
                "judge_reliability": float(reliability),
            }
    if not latest:
        raise GradselError(f"{store} has no scored round yet", "let `gradsel score --chunk-size M` finish first")
    selected = recorded_selection(store).problem_ids
    rank = {pid: i + 1 for i, pid in enumerate(selected)}
    return [row | {"suspect_key": pid in suspects, "selected_rank": rank.get(pid)} for pid, row in latest.items()]


def _audit_suspects(path: Path) -> set[str]:
    """The problem ids `gradsel audit --out` listed (Parquet or JSON lines; it lists suspects only)."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise GradselError(f"--audit {path} does not exist", "write it with `gradsel audit --store S --out FILE`")
    if Path(path).suffix.lower() == ".parquet":
        rows = pq.read_table(path, columns=["problem_id", "suspect"]).to_pylist()
    else:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["problem_id"] for r in rows if r.get("suspect", True)}


def write_ranking(store: Path, out: Path, audit: Path | None = None) -> int:
    """Write the ranking file that verl_sampler.GradselReplayBuffer re-reads (Parquet, replaced
    atomically); returns its rows."""
    import pyarrow as pa

    from gradsel.core.fsutil import atomic_write_table

    rows = ranking_rows(Path(store), audit)
    schema = pa.schema(
        [
            ("problem_id", pa.string()),
            ("round", pa.int32()),
            ("zero_advantage", pa.bool_()),
            ("judge_reliability", pa.float64()),
            ("suspect_key", pa.bool_()),
            ("selected_rank", pa.int32()),
        ]
    )
    assert tuple(schema.names) == RANKING_COLUMNS
    atomic_write_table(Path(out), pa.Table.from_pylist(rows, schema=schema))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    """`python -m gradsel.integrations.verl --store S --out RANKING [--audit SUSPECTS]`: (re)write the
    ranking file of a running verl V1 trainer's GradselReplayBuffer (docs/trainers.md)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m gradsel.integrations.verl", description=main.__doc__)
    parser.add_argument("--store", required=True, type=Path, help="a store with rounds (score --chunk-size, refresh)")
    parser.add_argument("--out", required=True, type=Path, help="the ranking file (Parquet) named in sampler_kwargs")
    parser.add_argument("--audit", type=Path, help="the suspects `gradsel audit --out` wrote (.parquet or .jsonl)")
    args = parser.parse_args(argv)
    try:
        if args.out.is_dir():
            raise GradselError(f"--out {args.out} is a directory", "give the ranking file's path, e.g. ranking.parquet")
        rows = write_ranking(args.store, args.out, args.audit)
    except GradselError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {rows} problems", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
