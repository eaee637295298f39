"""Checkpoint snapshots: what a round was scored with, by content, optionally frozen as a copy.

A trainer that overwrites its output directory must not be able to change, after the fact,
what a store says it scored. The snapshot records the resolved path, the model config and a
content hash of the weight files; `copy=True` also freezes the files into the store, as
hardlinks where the filesystem allows (no extra space) and copies elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gradsel.core.choices import HASH_MODES
from gradsel.core.errors import GradselError
from gradsel.inputs.models import resolve_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MIB = 2**20


@dataclass(frozen=True)
class Snapshot:
    path: str  # resolved directory the model is loaded from (the frozen copy when copied)
    source_path: str  # where it was snapshotted from
    content_hash: str  # "sha256:<hex>" or "fast:<hex>"
    config: dict
    files: list[dict] = field(default_factory=list)  # [{"name", "size"}] of hashed files
    base: "Snapshot | None" = None  # a PEFT adapter's base model

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Snapshot":
        base = Snapshot.from_dict(d["base"]) if d.get("base") else None
        return Snapshot(**{**d, "base": base})


def _hashed_files(directory: Path) -> list[Path]:
    """Weight files plus the JSON files that change what the weights compute."""
    files = [
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".json") or p.name.endswith(".model"))
    ]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise GradselError(
            f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {directory}",
            "point --model at a saved checkpoint directory",
        )
    return sorted(files, key=lambda p: p.name)


def check_safetensors(directory: Path) -> None:
    """Refuse a safetensors file whose header promises more bytes than the file holds: a
    checkpoint the trainer is still writing, or a copy cut short. Reads only the headers."""
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        ok = False
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 0 < n <= size - 8:
                try:
                    header = json.loads(fh.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                    ok = 8 + n + end == size
                except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                    ok = False
        if not ok:
            raise GradselError(
                f"{path} is incomplete or damaged ({size} bytes; its header does not match)",
                "if the trainer is still saving this checkpoint, wait for it to finish, then rerun",
            )


def content_hash(directory: Path, *, mode: str = "sha256") -> tuple[str, list[dict]]:
    """Hash a checkpoint directory. `fast` reads sizes and the first and last MiB of each file."""
    if mode not in HASH_MODES:
        raise GradselError(f"unknown hash mode {mode!r}", "use --hash sha256 or --hash fast")
    digest = hashlib.sha256()
    listing = []
    for path in _hashed_files(directory):
        size = path.stat().st_size
        listing.append({"name": path.name, "size": size})
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if mode == "sha256" or size <= 2 * MIB:
                for chunk in iter(lambda: fh.read(8 * MIB), b""):
                    digest.update(chunk)
            else:
                digest.update(fh.read(MIB))
                fh.seek(size - MIB)
                digest.update(fh.read(MIB))
    return f"{mode}:{digest.hexdigest()}", listing


def take_snapshot(model: str | Path, *, mode: str = "sha256", copy_into: Path | None = None) -> Snapshot:
    """Snapshot a checkpoint (and a PEFT adapter's base model); optionally freeze a copy."""
    directory = resolve_model_path(model)
    base = None
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        base_name = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise GradselError(
                f"{adapter_config} names no base_model_name_or_path", "set it to the local directory of the base model"
            )
        base = take_snapshot(base_name, mode=mode, copy_into=copy_into)
        config = json.loads(adapter_config.read_text())
    else:
        config = json.loads((directory / "config.json").read_text())
    check_safetensors(directory)
    digest, files = content_hash(directory, mode=mode)
    path = directory
    if copy_into is not None:
        path = freeze_copy(directory, copy_into / digest.split(":")[1][:16])
        if base is not None:
            _repoint_adapter(path, Path(base.path))
    return Snapshot(str(path), str(directory), digest, config, files, base)


def freeze_copy(src: Path, dest: Path) -> Path:
    """Hardlink (or copy) every file of a checkpoint directory into dest, atomically."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in src.iterdir():
        if not item.is_file():
            continue
        try:
            os.link(item, tmp / item.name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(item, tmp / item.name)
    os.replace(tmp, dest)
    return dest


def _repoint_adapter(adapter_copy: Path, base_copy: Path) -> None:
    # The frozen adapter must load on top of the frozen base, not the live one. Rewrite the
    # (possibly hardlinked) config as a new file so the original is never modified.
    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_copy)
    cfg_path.unlink()
    cfg_path.write_text(json.dumps(cfg, indent=2))


def loadable_path(store, snap: Snapshot) -> Path:
    """The directory engines load: the snapshot itself, or for a LoRA adapter the adapter merged
    onto its base once, into `store/merged/<hash>` (vLLM and the gradient pass then load one plain
    checkpoint, with the base model's tokenizer)."""
    path = Path(snap.path)
    if not (path / "adapter_config.json").is_file():
        return path
    from gradsel.inputs.models import save_merged

    return save_merged(path, store.root / "merged" / snap.content_hash.split(":")[1][:16])


def snapshot_into_store(store, model: str | Path, *, mode: str = "sha256", copy: bool = False) -> Snapshot:
    """Snapshot `model` and record it in the store manifest; refuse a different checkpoint."""
    snap = take_snapshot(model, mode=mode, copy_into=store.root / "checkpoints" if copy else None)
    recorded = store.read_manifest().get("snapshot")
    if recorded:
        if recorded["content_hash"].split(":")[0] == mode and recorded["content_hash"] != snap.content_hash:
            raise GradselError(
                f"store {store.root} was made with checkpoint {recorded['source_path']} "
                f"({recorded['content_hash'][:19]}), not this one ({snap.content_hash[:19]})",
                "use a new --store for another checkpoint (rounds come with `gradsel refresh`)",
            )
        if not copy and Path(recorded["path"]).is_dir():
            return Snapshot.from_dict(recorded)  # keep pointing at a frozen copy made earlier
    store.update_manifest(snapshot=snap.to_dict())
    return snap
