"""Hand-offs from a gradsel store to trainers (docs/trainers.md).

`gradsel.integrations.trl` follows the store's latest selection inside a running TRL trainer;
`gradsel.integrations.verl` prepares a verl relaunch (`gradsel handoff verl`) and writes the ranking
file that `gradsel.integrations.verl_sampler` (verl's V1 custom sampler, imported by verl, never by
gradsel) re-reads inside a running V1 trainer. Both read what
`gradsel select` recorded for a round (its `selection.json`), through `recorded_selection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradsel.core.errors import GradselError


@dataclass(frozen=True)
class RecordedSelection:
    round: int
    problem_ids: list[str]  # rank order, best first, as `select` wrote them
    path: Path  # the round's selection.json


def recorded_selection(store_dir: str | Path, round_index: int | None = None) -> RecordedSelection:
    """What `gradsel select` (or `refresh --top-k`) recorded for a round of a store with rounds:
    the latest complete round by default. A latest round without a selection is refused rather
    than answered with an older round's: that one was already trained on."""
    from gradsel.pipeline.rounds import round_dir, round_selection
    from gradsel.store.directory import existing_store

    store = existing_store(store_dir)
    manifest = store.read_manifest()
    if not manifest.get("rounds_store"):
        raise GradselError(
            f"{store_dir} is a store without rounds: `gradsel select` records no selection in it",
            "create the store with `gradsel score --chunk-size M ...`, or hand the file that "
            "`gradsel select --out FILE` wrote to the trainer yourself",
        )
    complete = [r for r in manifest["rounds"] if "checkpoint" in r]
    if round_index is None:
        if not complete:
            raise GradselError(
                f"{store_dir} has no complete round yet",
                "let `gradsel score --chunk-size M` (or the running `refresh`) finish first",
            )
        entry = complete[-1]
    else:
        entry = next((r for r in complete if r["round"] == round_index), None)
        if entry is None:
            raise GradselError(
                f"{store_dir} has no complete round {round_index}",
                f"complete rounds: {', '.join(str(r['round']) for r in complete) or 'none'}",
            )
    ids = round_selection(Path(store_dir), entry)
    if ids is None:
        raise GradselError(
            f"round {entry['round']} of {store_dir} has no selection yet",
            f"run `gradsel select --store {store_dir} --top-k K --out FILE` first",
        )
    if not ids:
        raise GradselError(f"round {entry['round']}'s selection is empty", "select at least one problem")
    return RecordedSelection(entry["round"], list(ids), round_dir(Path(store_dir), entry["round"]) / "selection.json")
