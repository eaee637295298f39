"""A stage of the store (rollouts/<split>, features/<id>) and its lifecycle, in one place.

Every stage goes the same way: complete for these inputs? (stage.json holds the key) -> claim the
directory for these inputs (inputs.json) -> which of its shards, for this part of a `--shard` split,
are still to make -> make them (make_shards: lock, made-meanwhile check, marker with its cost) ->
finish: sum the shards' costs, write stage.json, enter the stage in the manifest. The stages say
what a shard holds and what the manifest records; this object says how a stage is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gradsel.store.directory import (
    Part,
    Store,
    check_stage_key,
    make_shards,
    mark_stage_complete,
    shard_done,
    stage_complete,
    stage_cost,
)


def split_parts(count: int) -> list[Part]:
    """The parts of a `--shard i/N` split, one per worker (Ray tasks, a Slurm array)."""
    return [Part(i, count) for i in range(count)]


@dataclass(frozen=True)
class Stage:
    """A stage directory of a store and the key of its inputs. A stage whose shards sit in
    sub-directories (features/<id>/train, /val) hands them out with `sub`."""

    store: Store
    directory: Path
    key: str

    @classmethod
    def at(cls, store: Store, *parts: str, key: str) -> Stage:
        """The stage at store/<parts...> (made if missing), for inputs with this key."""
        return cls(store, store.stage_dir(*parts), key)

    @property
    def name(self) -> str:
        """Its path in the store, as the manifest's costs name it: rollouts/train, features/<id>."""
        return self.directory.relative_to(self.store.root).as_posix()

    def sub(self, name: str) -> Stage:
        """A sub-directory of shards of this stage (same inputs), made if missing."""
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        return Stage(self.store, directory, self.key)

    # -- complete? and claim -------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Marked complete (stage.json) for these inputs, by whichever run found every shard done."""
        return stage_complete(self.directory, self.key)

    def record(self) -> dict:
        """What stage.json holds (the key, what the stage made, its cost); a complete stage only."""
        return json.loads((self.directory / "stage.json").read_text())

    def claim(self, what: str) -> None:
        """Refuse to mix shards made from different inputs here; else record these inputs."""
        check_stage_key(self.directory, self.key, what)

    # -- shards --------------------------------------------------------------------------------

    def done(self, index: int, source: str | None = None) -> bool:
        return shard_done(self.directory, index, source=source)

    @staticmethod
    def owned(n_shards: int, part: Part | None) -> list[int]:
        """The shards `part` makes (every one without a part)."""
        return [i for i in range(n_shards) if part is None or part.owns(i)]

    def todo(
        self, n_shards: int, part: Part | None = None, source: Callable[[int], str | None] = lambda index: None
    ) -> list[int]:
        """The shards of `part` not done yet (checked against `source(index)`, the checksum of the
        input shard each is made from, where there is one)."""
        return [i for i in self.owned(n_shards, part) if not self.done(i, source=source(i))]

    def others_done(self, n_shards: int, part: Part | None) -> bool:
        """Whether the other parts' shards are done too (always, without a part): then this run
        finishes the stage."""
        mine = set(self.owned(n_shards, part))
        return all(self.done(i) for i in range(n_shards) if i not in mine)

    def make(
        self,
        todo: Iterable[int],
        make: Callable,
        *,
        source: Callable[[int], str | None] = lambda index: None,
        tokens: Callable[[], int] = lambda: 0,
    ) -> Iterator[tuple[int, bool]]:
        """Make the shards of `todo` (store.make_shards: each under its lock, skipped if another
        process made it meanwhile, written with a marker that records its cost). Yields
        (index, made) after each shard."""
        yield from make_shards(self.directory, todo, make, source=source, tokens=tokens)

    def cost(self, n_shards: int) -> dict:
        """What its shards cost, from their markers (store.stage_cost)."""
        return stage_cost(self.directory, n_shards)

    # -- finish --------------------------------------------------------------------------------

    def finish(self, info: dict, *, manifest: dict, costs: dict) -> None:
        """Mark the stage complete (stage.json: the key and `info`), then enter it in the
        manifest: the top-level `manifest` fields, and `costs` (stage name -> cost) merged."""
        mark_stage_complete(self.directory, self.key, **info)
        self.store.update_manifest(costs=costs, **manifest)
