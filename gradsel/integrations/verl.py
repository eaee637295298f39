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
        raise GradselError(f"--checkpoints {checkpoints} is not a directory",
                           "pass the trainer.default_local_dir of the verl run to resume")
    tracker = checkpoints / TRACKER
    if not tracker.is_file():
        found = sorted(p.name for p in checkpoints.glob("global_step_*"))
        raise GradselError(f"{checkpoints} has no {TRACKER}: verl's resume_mode=auto would start from scratch"
                           + (f" (it holds {', '.join(found[-3:])})" if found else ""),
                           "pass the trainer.default_local_dir of a verl run that saved a checkpoint "
                           "(trainer.save_freq); an async_save run writes no tracker")
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise GradselError(f"{tracker} holds {text[:40]!r}, not a step number", "verl writes the step of the latest checkpoint there")
    step = int(text)
    folder = checkpoints / f"global_step_{step}"
    if not folder.is_dir():
        raise GradselError(f"{tracker} names step {step}, but {folder.name} is missing",
                           "verl would start from scratch: restore the checkpoint or the tracker")
    return folder, step


def prepare_relaunch(store: Path, checkpoints: Path, out: Path | None, *, train_batch_size: int, epochs: int = 1,
                     force: bool = False) -> Handoff:
    """Write the latest round's selection as verl Parquet, move the checkpoint's stale dataloader
    state aside, and return the launcher's overrides. Everything is checked before anything is
    written; the Parquet is written before the state moves."""
    from gradsel.pipeline.rounds import round_dir
    from gradsel.selection.formats import check_out_path, write_selection
    from gradsel.selection.select import Selection, SelectConfig
    from gradsel.store.stages import Store

    if train_batch_size < 1 or epochs < 1:
        raise GradselError("--train-batch-size and --epochs must be at least 1", "for example --train-batch-size 256 --epochs 1")
    selection = recorded_selection(store)
    folder, step = latest_checkpoint(Path(checkpoints))
    rows = len(selection.problem_ids)
    steps_per_epoch = rows // train_batch_size
    if steps_per_epoch == 0:
        raise GradselError(f"round {selection.round}'s selection has {rows} problems, fewer than one batch of "
                           f"{train_batch_size}: verl drops an incomplete batch and would train on none",
                           "select more problems (--top-k), or pass the smaller data.train_batch_size you launch with")
    out = Path(out) if out is not None else Path(checkpoints) / f"gradsel-round-{selection.round:03d}.parquet"
    check_out_path(str(out), force)
    stale, moved = folder / "data.pt", folder / f"data.pt.stale-before-round-{selection.round:03d}"
    if stale.exists() and moved.exists():
        raise GradselError(f"{folder.name} holds both data.pt and {moved.name}",
                           "verl saved this step again after an earlier hand-off: move one of them away yourself")

    round_store = Store(round_dir(Path(store), selection.round))
    # The recorded ids, in their rank order, through select's own writer. The selection's mode
    # was not recorded, so the sidecar says where the ids came from instead of a mode.
    write_selection(round_store, Selection(selection.problem_ids, [float("nan")] * rows, rows, SelectConfig(all=True)),
                    fmt="verl", out=str(out), annotate=False, force=True)
    sidecar = out.with_name(out.name + ".gradsel.json")
    from gradsel.core.fsutil import atomic_write_json

    atomic_write_json(sidecar, json.loads(sidecar.read_text()) | {
        "mode": None, "config": None, "recorded_selection": str(selection.path), "round": selection.round,
        "handoff": {"trainer": "verl", "checkpoint": str(folder), "global_step": step}})
    moved_before = moved if moved.exists() else None
    if stale.exists():
        stale.rename(moved)
    total_epochs = step // steps_per_epoch + epochs
    total_steps = step + epochs * steps_per_epoch
    overrides = [f"data.train_files={out.resolve()}", "trainer.resume_mode=auto",
                 f"trainer.default_local_dir={Path(checkpoints).resolve()}",
                 f"trainer.total_epochs={total_epochs}", f"trainer.total_training_steps={total_steps}"]
    return Handoff(out, rows, selection.round, folder, step, steps_per_epoch, total_epochs, total_steps,
                   None if moved_before else moved if moved.exists() else None, moved_before, overrides)
