"""TRL: a GRPOTrainer that draws what gradsel selected, and follows new selections without a restart.

TRL's maintainers answer requests for dynamic data weighting (trl#2801) with: subclass
`GRPOTrainer`, override `_get_train_sampler`, and change the sampler from a `TrainerCallback`.
This module is that, for gradsel:

- `SelectionSampler` yields dataset rows in the layout of TRL's `RepeatSampler` (each prompt
  `mini_repeat_count` = num_generations times in a row, `batch_size` prompts a generation batch,
  each generation batch `repeat_count` times), but only rows gradsel selected: uniformly in a
  seeded order, or with replacement in proportion to a weight per row (`weighting="rank"`).
  The order depends only on (seed, epoch, generation batch, selection), never on the process,
  so every rank yields the same indices, as RepeatSampler guarantees.
- `FollowSelection` is the callback: at the end of every epoch (or every N optimizer steps) it
  re-reads the store's latest recorded selection (a `gradsel refresh` + `select` that another
  process ran meanwhile) and swaps it into the sampler; the next generation batch draws from it.
- `GradselGRPOTrainer` wires the two into TRL's own GRPOTrainer.

The trainer's dataset is the whole pool; the selection only chooses what is drawn. An epoch is a
fixed number of prompts (`prompts_per_epoch`, by default the first selection's size rounded down
to whole generation batches), because the Trainer fixes its epoch length when training starts.
A selection of another size is cycled through (smaller) or cut (larger) to fill it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Sampler

from gradsel.core import console
from gradsel.core.errors import GradselError
from gradsel.integrations import RecordedSelection, recorded_selection

try:  # TRL is a dev extra, not a dependency: the sampler works without it.
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


def _generator(*key) -> torch.Generator:
    """A torch generator seeded from the key alone (no process or call history in it)."""
    digest = hashlib.sha256("/".join(map(str, ("gradsel-trl-sampler", *key))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class SelectionSampler(Sampler[int]):
    """RepeatSampler's layout over the selected rows only; `set_selection` swaps them at the next
    generation batch."""

    def __init__(
        self,
        positions: Sequence[int],
        *,
        prompts_per_epoch: int | None = None,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        size = prompts_per_epoch if prompts_per_epoch is not None else len(positions)
        self.batches_per_epoch = size // batch_size
        if self.batches_per_epoch < 1:
            raise GradselError(
                f"an epoch of {size} prompts holds no whole generation batch of {batch_size} prompts",
                "select more problems, or lower the generation batch size",
            )
        self.set_selection(positions, weights)

    def set_selection(self, positions: Sequence[int], weights: Sequence[float] | None = None) -> None:
        """Draw from these dataset rows from the next generation batch on."""
        if not positions:
            raise GradselError("the selection is empty", "select at least one problem")
        if weights is not None and (len(weights) != len(positions) or min(weights) < 0 or sum(weights) <= 0):
            raise GradselError(
                "weights must be one non-negative number per selected row, not all zero",
                "pass weighting='rank', or no weights",
            )
        self.positions = [int(p) for p in positions]
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self._changed = True

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before every epoch
        self.epoch = epoch

    def _stream(self, start_batch: int):
        """Prompts from generation batch `start_batch` of this epoch on, for the current selection."""
        n = len(self.positions)
        if self.weights is not None:
            draws = torch.multinomial(
                self.weights,
                self.batches_per_epoch * self.batch_size,
                replacement=True,
                generator=_generator(self.seed, self.epoch, start_batch, "weighted"),
            )
            yield from (self.positions[i] for i in draws.tolist())
            return
        cycle = 0
        while True:  # a selection smaller than the epoch is cycled through, each pass in a fresh order
            order = (
                torch.randperm(n, generator=_generator(self.seed, self.epoch, start_batch, cycle)).tolist()
                if self.shuffle
                else range(n)
            )
            yield from (self.positions[i] for i in order)
            cycle += 1

    def __iter__(self):
        self._changed = True
        stream = None
        for batch in range(self.batches_per_epoch):
            if self._changed:  # a new selection (or a new epoch): draw from it from this batch on
                stream, self._changed = self._stream(batch), False
            chunk = [next(stream) for _ in range(self.batch_size)]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size * self.mini_repeat_count * self.repeat_count


def dataset_problem_ids(dataset, *, prompt_key: str | None = None, answer_key: str | None = None) -> list[str]:
    """gradsel's problem id of every dataset row, as `gradsel score` named them (data_source:index)."""
    from gradsel.inputs.problems import problem_from_row

    ids = []
    for i, row in enumerate(dataset):
        try:
            ids.append(problem_from_row(row, i, prompt_key=prompt_key, answer_key=answer_key).problem_id)
        except ValueError as exc:
            raise GradselError(
                f"row {i} of the trainer's dataset: {exc}",
                "pass the pool file the store was scored from as train_dataset",
            ) from exc
    return ids


def rank_weights(n: int) -> list[float]:
    """Linear in rank: the best of n selected problems weighs n, the last 1."""
    return [float(n - i) for i in range(n)]


class FollowSelection(TrainerCallback):
    """Re-read the store's latest selection at the end of each epoch (or every `every_n_steps`
    optimizer steps) and swap it into the sampler. A latest round without a selection yet (a
    refresh done, its `select` not) keeps the current selection.

    With `refresh` (the selection options of `gradsel refresh`, e.g. ["--top-k", "256"]) the
    callback first saves the policy to OUTPUT_DIR/gradsel-step-N through the trainer and runs
    `gradsel refresh --store S --model OUTPUT_DIR/gradsel-step-N ...` itself (on the main process;
    the others wait), so the next round is scored with the checkpoint being trained."""

    def __init__(
        self,
        store: str | Path,
        *,
        every_n_steps: int | None = None,
        weighting: str = "uniform",
        refresh: Sequence[str] | None = None,
    ) -> None:
        if weighting not in ("uniform", "rank"):
            raise GradselError(f"unknown weighting {weighting!r}", "use 'uniform' or 'rank'")
        if every_n_steps is not None and every_n_steps < 1:
            raise GradselError(f"every_n_steps must be at least 1, got {every_n_steps}", "or None: every epoch")
        self.store, self.every_n_steps, self.weighting = Path(store), every_n_steps, weighting
        self.refresh = None if refresh is None else [str(a) for a in refresh]
        if self.refresh is not None and "--format" not in self.refresh:
            self.refresh += ["--format", "ids"]  # refresh writes its selection to stdout, which is dropped
        self.trainer = None  # set by GradselGRPOTrainer: saving a checkpoint needs it
        self.sampler: SelectionSampler | None = None
        self.position_of: dict[str, int] = {}
        self.current: RecordedSelection | None = None
        self.history: list[tuple[int, int]] = []  # (global step, round) of every selection swapped in

    def positions(self, selection: RecordedSelection) -> tuple[list[int], list[float] | None]:
        missing = [pid for pid in selection.problem_ids if pid not in self.position_of]
        if missing:
            raise GradselError(
                f"{len(missing)} problems of round {selection.round}'s selection are not in the "
                f"trainer's dataset (first: {missing[0]})",
                "pass the whole pool the store was scored from as train_dataset",
            )
        positions = [self.position_of[pid] for pid in selection.problem_ids]
        return positions, rank_weights(len(positions)) if self.weighting == "rank" else None

    def run_refresh(self, global_step: int) -> None:
        """Save the policy and score the store's next round with it (`gradsel refresh`)."""
        import subprocess
        import sys

        checkpoint = Path(self.trainer.args.output_dir) / f"gradsel-step-{global_step}"
        self.trainer.save_model(str(checkpoint))  # every rank: FSDP and DeepSpeed gather the weights here
        if self.trainer.is_world_process_zero():
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gradsel.cli",
                    "-q",
                    "refresh",
                    "--store",
                    str(self.store),
                    "--model",
                    str(checkpoint),
                    *self.refresh,
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                console.warn(
                    f"gradsel refresh on {checkpoint} failed (exit {proc.returncode}): "
                    + next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "")
                )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def reload(self, global_step: int) -> bool:
        """Swap in the store's latest selection if it is new; True if it was."""
        if self.refresh is not None:
            self.run_refresh(global_step)
        latest = _latest_on_every_rank(self.store)
        if isinstance(latest, str):
            console.warn(f"keeping round {self.current.round}'s selection: {latest}")
            return False
        if (latest.round, latest.problem_ids) == (self.current.round, self.current.problem_ids):
            return False
        try:
            self.sampler.set_selection(*self.positions(latest))
        except GradselError as exc:  # mid-run: keep training on what it has rather than lose the run
            console.warn(f"keeping round {self.current.round}'s selection: {exc.message}")
            return False
        self.current = latest
        self.history.append((global_step, latest.round))
        console.info(
            f"gradsel: step {global_step}: drawing round {latest.round}'s selection "
            f"({len(latest.problem_ids)} problems)"
        )
        return True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.every_n_steps is None and self.sampler is not None:
            self.reload(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps is not None and self.sampler is not None and state.global_step % self.every_n_steps == 0:
            self.reload(state.global_step)


def _latest_on_every_rank(store: Path) -> RecordedSelection | str:
    """Rank 0's reading of the store's latest selection (or why there is none), on every rank: a
    `select` landing between two ranks' reads must not give them different selections (their
    groups would no longer line up)."""
    try:
        found: RecordedSelection | str = recorded_selection(store)
    except GradselError as exc:
        found = exc.message
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [found]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return found


def _grpo_trainer_class():
    try:
        from trl import GRPOTrainer
    except ImportError as exc:
        raise GradselError("TRL is not installed", "pip install trl") from exc
    return GRPOTrainer


def make_trainer_class(base=None):
    """GradselGRPOTrainer over TRL's GRPOTrainer (or another trainer with RepeatSampler's
    `_get_train_sampler`, e.g. RLOOTrainer)."""
    base = base or _grpo_trainer_class()

    class GradselGRPOTrainer(base):
        """TRL's trainer, drawing only what the store's selection holds.

        store: a gradsel store with rounds. selection_round: the round whose selection to start
        from (default: the latest). follow: re-read the latest selection at the end of each epoch
        ("epoch"), every N optimizer steps (an int), or never (None). refresh: run `gradsel refresh`
        with these selection options on the saved policy first (FollowSelection). weighting:
        "uniform" or "rank". prompts_per_epoch: prompts an epoch draws (default: the first selection's size).
        problem_ids: the dataset rows' gradsel ids, if the rows no longer carry the columns they
        were scored from."""

        def __init__(
            self,
            *args,
            store: str | Path,
            selection_round: int | None = None,
            follow="epoch",
            weighting: str = "uniform",
            refresh: Sequence[str] | None = None,
            prompts_per_epoch: int | None = None,
            problem_ids: list[str] | None = None,
            **kwargs,
        ):
            self.gradsel = FollowSelection(
                store,
                every_n_steps=None if follow in ("epoch", None) else int(follow),
                weighting=weighting,
                refresh=refresh,
            )
            self.gradsel_follow = follow is not None
            self.gradsel.current = recorded_selection(store, selection_round)
            self.gradsel_prompts_per_epoch = prompts_per_epoch
            super().__init__(*args, **kwargs)
            self.gradsel.trainer = self
            ids = problem_ids if problem_ids is not None else dataset_problem_ids(self.train_dataset)
            self.gradsel.position_of = {pid: i for i, pid in enumerate(ids)}
            self.gradsel.positions(self.gradsel.current)  # refuse a selection the dataset lacks now, not mid-run
            if self.gradsel_follow:
                self.add_callback(self.gradsel)

        def _get_train_sampler(self, dataset=None):
            positions, weights = self.gradsel.positions(self.gradsel.current)
            batch = self.args.generation_batch_size // self.num_generations
            sampler = SelectionSampler(
                positions,
                weights=weights,
                prompts_per_epoch=self.gradsel_prompts_per_epoch or len(positions) // batch * batch,
                mini_repeat_count=self.num_generations,
                batch_size=batch,
                repeat_count=self.num_iterations * self.args.steps_per_generation,
                shuffle=self.shuffle_dataset,
                seed=self.args.seed,
            )
            self.gradsel.sampler = sampler
            return sampler

    return GradselGRPOTrainer


def __getattr__(name: str):
    if name == "GradselGRPOTrainer":  # built on first access: TRL is imported only then
        cls = make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
