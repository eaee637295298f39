"""Crash safety: SIGKILL `rollout`, `score` and `refresh` at seeded random moments, rerun the same
command until it finishes, and compare the store with an uninterrupted run's, bitwise (hf engine,
seeded). Also: finished shards are never redone, and readers never see a round being written.

    .venv/bin/python tests/test_reliability.py --kills 10   # prints the table in docs/reliability.md
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import GRADSEL, ROOT, run_cli  # noqa: E402

ROLLOUT = ["--engine", "hf", "--max-tokens", "8", "--n", "4", "--shard-size", "3"]
SCORE = [*ROLLOUT, "--n-val", "4"]


@dataclass
class Chain:
    """One command killed again and again; each time a run gets to the end unkilled, its store is
    compared with the uninterrupted one and the chain starts again from the command's start state."""
    command: str
    kills: int = 0
    killed_in: list[str] = field(default_factory=list)  # the stage each kill interrupted
    completions: int = 0  # runs that finished, each compared with the reference
    shards_redone: int = 0  # shards finished before a kill and written again after it (must be 0)
    identical: bool = True


def _markers(store: Path) -> dict[str, int]:
    """Finished shards: marker path -> mtime."""
    if not store.exists():
        return {}
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("shard-*.done.json")}


def _stage_of(store: Path) -> str:
    """The stage of the newest file in the store (for the report)."""
    files = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    if not files:
        return "start"
    parts = max(files, key=lambda p: p.stat().st_mtime_ns).relative_to(store).parts
    return next((p for p in parts if p in ("rollouts", "features")), "snapshot/manifest")


def _env() -> dict:
    return {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def kill_chain(command: str, args: list[str], store: Path, *, kills: int, span: float, seed: int,
               same, reset) -> Chain:
    """Run `gradsel args` and SIGKILL it after a seeded random delay in (0.5, span) s, `kills`
    times; every rerun resumes the store the last one left. A run that finishes first is checked
    with same(store) and the store is put back with reset(). Then one last run to the end."""
    rng = random.Random(f"{command}/{seed}")
    chain = Chain(command)

    def finished() -> None:
        chain.completions += 1
        chain.identical &= same(store)

    while chain.kills < kills:
        before = _markers(store)
        proc = subprocess.Popen([*GRADSEL, *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.5, span))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        after = _markers(store)
        chain.shards_redone += sum(after.get(k) != v for k, v in before.items())
        if proc.returncode == -signal.SIGKILL:
            chain.kills += 1
            chain.killed_in.append(_stage_of(store))
        else:
            assert proc.returncode == 0, f"{command} exited {proc.returncode}"
            finished()
            reset()
    before = _markers(store)
    run_cli(*args)
    after = _markers(store)
    chain.shards_redone += sum(after.get(k) != v for k, v in before.items())
    finished()
    return chain


def _same_tables(a: Path, b: Path) -> bool:
    """The same Parquet files (rollouts, vectors, scores, chunks), with equal tables."""
    def tables(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*.parquet")
                      if "snapshot" not in p.parts and p.name != "history.parquet")

    return tables(a) == tables(b) and all(pq.read_table(a / rel).equals(pq.read_table(b / rel)) for rel in tables(a))


def _selection(store: Path) -> list[str]:
    return run_cli("select", "--store", str(store), "--top-k", "5", "--allow-fewer", "--format", "ids").stdout.split()


def run_faults(work: Path, kills: int, seed: int = 0) -> list[Chain]:
    """Kill chains of `rollout`, `score` (round 0) and `refresh` (round 1), each against a store
    made by the same command uninterrupted."""
    from gradsel.models import resolve_model_path
    from gradsel.tasks import write_regime

    pool, val = write_regime(work / "data", "noisy", size=24, val_size=6, seed=4)
    ckpt2 = work / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    cfg = json.loads((ckpt2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.1e-5  # a new checkpoint: a different content hash
    (ckpt2 / "config.json").write_text(json.dumps(cfg))

    def commands(store: Path) -> dict[str, list[str]]:
        return {
            "rollout": ["rollout", "--model", "tiny-arith", "--problems", str(pool), "--store", str(store), *ROLLOUT],
            "score": ["score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store),
                      "--chunk-size", "12", *SCORE],
            "refresh": ["refresh", "--store", str(store), "--model", str(ckpt2)],
        }

    def timed(args: list[str]) -> float:
        t = time.perf_counter()
        run_cli(*args)
        return time.perf_counter() - t

    def fresh(store: Path):
        return lambda: shutil.rmtree(store, ignore_errors=True)

    chains = []
    ref, faulty = work / "ref-rollout", work / "faulty-rollout"
    span = timed(commands(ref)["rollout"])
    chains.append(kill_chain("rollout", commands(faulty)["rollout"], faulty, kills=kills, span=span, seed=seed,
                             same=lambda s: _same_tables(ref, s), reset=fresh(faulty)))

    ref, faulty = work / "ref-rounds", work / "faulty-rounds"
    span = timed(commands(ref)["score"])
    ref_selection = _selection(ref)  # round 0's selection, which refresh needs
    chains.append(kill_chain("score", commands(faulty)["score"], faulty, kills=kills, span=span, seed=seed,
                             same=lambda s: _same_tables(ref, s) and _selection(s) == ref_selection,
                             reset=fresh(faulty)))

    base = work / "faulty-rounds-after-round-0"
    shutil.copytree(faulty, base)
    span = timed(commands(ref)["refresh"])
    ref_selection = _selection(ref)

    def back_to_round_0():
        shutil.rmtree(faulty)
        shutil.copytree(base, faulty)

    chains.append(kill_chain("refresh", commands(faulty)["refresh"], faulty, kills=kills, span=span, seed=seed,
                             same=lambda s: _same_tables(ref, s) and _selection(s) == ref_selection,
                             reset=back_to_round_0))
    return chains


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_store(tmp_path):
    chains = run_faults(tmp_path, kills=7)
    assert sum(c.kills for c in chains) >= 20, [(c.command, c.kills) for c in chains]
    for c in chains:
        assert c.identical and c.completions >= 1, c
        assert c.shards_redone == 0, c  # only the in-flight shard is ever redone


def test_readers_never_see_a_round_being_written(tmp_path):
    """While refresh writes round 1, select and info read round 0, whole, and never block."""
    from gradsel.tasks import write_regime

    pool, val = write_regime(tmp_path / "data", "clean", size=12, val_size=4, seed=1)
    store = tmp_path / "store"
    run_cli("score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store),
            "--chunk-size", "6", *SCORE)
    first = _selection(store)
    # A refresh that died half way: round 1 is recorded, its scores are not.
    m = json.loads((store / "manifest.json").read_text())
    m["rounds"].append({"round": 1, "dir": "rounds/round-001", "chunk_ids": m["pool_order"][6:12], "model": "x"})
    (store / "manifest.json").write_text(json.dumps(m))
    (store / "rounds/round-001/rollouts/train").mkdir(parents=True)
    (store / "rounds/round-001/rollouts/train/shard-00000.parquet").write_bytes(b"half a shard")
    (store / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))  # a live writer
    t = time.perf_counter()
    assert _selection(store) == first
    info = json.loads(run_cli("info", "--store", str(store)).stdout)
    assert [r["checkpoint"] == "(incomplete)" for r in info["rounds"]] == [False, True]
    assert time.perf_counter() - t < 120  # returned: nothing waited on the lock


def _table(chains: list[Chain]) -> str:
    lines = ["| command | SIGKILLs | last file written before the kill | runs finished and compared | "
             "finished shards redone | outcome |", "| --- | ---: | --- | ---: | ---: | --- |"]
    for c in chains:
        stages = ", ".join(f"{s} x{c.killed_in.count(s)}" for s in dict.fromkeys(c.killed_in))
        lines.append(f"| `{c.command}` | {c.kills} | {stages} | {c.completions} | {c.shards_redone} | "
                     f"{'identical to the uninterrupted store' if c.identical else 'DIFFERENT'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs per command")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(_table(run_faults(Path(d), a.kills, a.seed)))
