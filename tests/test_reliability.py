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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from helpers import GRADSEL, ONE_THREAD, ROOT, run_cli

ROLLOUT = ["--engine", "hf", "--max-tokens", "8", "--n", "4", "--shard-size", "3"]
SCORE = [*ROLLOUT, "--n-val", "4"]


@dataclass
class Chain:
    """One command killed again and again; each time a run gets to the end unkilled, its store is
    compared with the uninterrupted one and the chain starts again from the command's start state."""

    command: str
    kills: int = 0
    killed_at: list[str] = field(default_factory=list)  # finished rollout+vector shards at each kill
    completions: int = 0  # runs that finished, each compared with the reference
    shards_redone: int = 0  # shards finished before a kill and written again after it (must be 0)
    identical: bool = True


def _markers(store: Path) -> dict[str, int]:
    """Finished shards: marker path -> mtime."""
    if not store.exists():
        return {}
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("shard-*.done.json")}


def _progress(store: Path, baseline: set[str]) -> str:
    """Where a kill landed: shards of rollouts and of vectors finished since the start state."""
    done = [Path(p).parts for p in _markers(store) if p not in baseline]
    rollouts = sum("rollouts" in parts for parts in done)
    vectors = sum("features" in parts for parts in done)
    return f"{rollouts}+{vectors}"


def _env() -> dict:
    return {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **ONE_THREAD}


def kill_chain(
    command: str, args: list[str], store: Path, *, kills: int, total: int, span: float, seed: int, same, reset
) -> Chain:
    """Run `gradsel args` and SIGKILL it `kills` times, each rerun resuming what the last left.
    Each kill lands at a seeded random point of the work still to do: just after a random one of
    the shards this run has left to finish (of `total`, the uninterrupted run's count), so inside
    the next shard; or, with every shard done, at a random time up to `span` (the uninterrupted
    run's duration) after the start: in startup, in checking what is done, in writing the scores
    and the manifest, or not at all.
    A run that finishes first is checked with same(store), and reset() puts the store back."""
    rng = random.Random(f"{command}/{seed}")
    chain = Chain(command)
    baseline = set(_markers(store))  # the start state's shards (round 0's, for refresh)

    def finished() -> None:
        chain.completions += 1
        chain.identical &= same(store)

    while chain.kills < kills:
        before = _markers(store)
        target = rng.randint(len(set(before) - baseline) + 1, total + 1)  # total + 1: after the last shard
        proc = subprocess.Popen(
            [*GRADSEL, *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if target > total:
            try:
                proc.wait(timeout=rng.uniform(0.5, span))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        else:
            while proc.poll() is None and len(set(_markers(store)) - baseline) < target:
                time.sleep(0.002)  # a tiny-arith shard takes tens of milliseconds
            time.sleep(rng.uniform(0.0, 0.01))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = _markers(store)
        chain.shards_redone += sum(after.get(k) != v for k, v in before.items())
        if proc.returncode == -signal.SIGKILL:
            chain.kills += 1
            chain.killed_at.append(_progress(store, baseline))
        else:
            assert proc.returncode == 0, f"{command} exited {proc.returncode}"
            finished()
            reset()
    before = _markers(store)
    run_cli(*args, env=ONE_THREAD)
    after = _markers(store)
    chain.shards_redone += sum(after.get(k) != v for k, v in before.items())
    finished()
    return chain


def _same_tables(a: Path, b: Path) -> bool:
    """The same Parquet files (rollouts, vectors, scores, chunks), with equal tables."""

    def tables(root: Path) -> list[Path]:
        return sorted(
            p.relative_to(root)
            for p in root.rglob("*.parquet")
            if "snapshot" not in p.parts and p.name != "history.parquet"
        )

    return tables(a) == tables(b) and all(pq.read_table(a / rel).equals(pq.read_table(b / rel)) for rel in tables(a))


def _selection(store: Path) -> list[str]:
    return run_cli("select", "--store", str(store), "--top-k", "5", "--allow-fewer", "--format", "ids").stdout.split()


def run_faults(work: Path, kills: int, seed: int = 0) -> list[Chain]:
    """Kill chains of `rollout`, `score` (round 0) and `refresh` (round 1), each against a store
    made by the same command uninterrupted."""
    from gradsel.demo.tasks import write_regime
    from gradsel.inputs.models import resolve_model_path

    pool, val = write_regime(work / "data", "noisy", size=24, val_size=6, seed=4)
    ckpt2 = work / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    cfg = json.loads((ckpt2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.1e-5  # a new checkpoint: a different content hash
    (ckpt2 / "config.json").write_text(json.dumps(cfg))

    def commands(store: Path) -> dict[str, list[str]]:
        return {
            "rollout": ["rollout", "--model", "tiny-arith", "--problems", str(pool), "--store", str(store), *ROLLOUT],
            "score": [
                "score",
                "--model",
                "tiny-arith",
                "--pool",
                str(pool),
                "--val",
                str(val),
                "--store",
                str(store),
                "--chunk-size",
                "12",
                *SCORE,
            ],
            "refresh": ["refresh", "--store", str(store), "--model", str(ckpt2)],
        }

    def uninterrupted(args: list[str], store: Path) -> dict:
        """Run to the end; the number of shards it finished and how long it took."""
        before, t = set(_markers(store)), time.perf_counter()
        run_cli(*args, env=ONE_THREAD)
        return {"total": len(set(_markers(store)) - before), "span": time.perf_counter() - t}

    def fresh(store: Path):
        return lambda: shutil.rmtree(store, ignore_errors=True)

    def rollout_lane() -> list[Chain]:
        ref, faulty = work / "ref-rollout", work / "faulty-rollout"
        ref_run = uninterrupted(commands(ref)["rollout"], ref)
        return [
            kill_chain(
                "rollout",
                commands(faulty)["rollout"],
                faulty,
                kills=kills,
                seed=seed,
                **ref_run,
                same=lambda s: _same_tables(ref, s),
                reset=fresh(faulty),
            )
        ]

    def rounds_lane() -> list[Chain]:
        """score, then refresh on the store the killed score chain left."""
        ref, faulty = work / "ref-rounds", work / "faulty-rounds"
        ref_run = uninterrupted(commands(ref)["score"], ref)
        ref_selection = _selection(ref)  # round 0's selection, which refresh needs
        score = kill_chain(
            "score",
            commands(faulty)["score"],
            faulty,
            kills=kills,
            seed=seed,
            **ref_run,
            same=lambda s: _same_tables(ref, s) and _selection(s) == ref_selection,
            reset=fresh(faulty),
        )

        base = work / "faulty-rounds-after-round-0"
        shutil.copytree(faulty, base)
        ref_run = uninterrupted(commands(ref)["refresh"], ref)
        ref_selection = _selection(ref)

        def back_to_round_0():
            shutil.rmtree(faulty)
            shutil.copytree(base, faulty)

        refresh = kill_chain(
            "refresh",
            commands(faulty)["refresh"],
            faulty,
            kills=kills,
            seed=seed,
            **ref_run,
            same=lambda s: _same_tables(ref, s) and _selection(s) == ref_selection,
            reset=back_to_round_0,
        )
        return [score, refresh]

    # The two lanes touch separate stores, so they run side by side: one process each, one torch
    # thread each (ONE_THREAD), on CI's two cores. Where each kill lands is seeded per command and
    # counted in shard markers, so the other lane's load moves no kill to another shard.
    with ThreadPoolExecutor(max_workers=2) as lanes:
        rollout, rounds = lanes.submit(rollout_lane), lanes.submit(rounds_lane)
        chains = rollout.result() + rounds.result()
    return chains


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_store(tmp_path):
    chains = run_faults(tmp_path, kills=7)
    assert sum(c.kills for c in chains) >= 20, [(c.command, c.kills) for c in chains]
    for c in chains:
        assert c.identical and c.completions >= 1, c
        assert c.shards_redone == 0, c  # only the in-flight shard is ever redone


def test_readers_never_see_a_round_being_written(tmp_path):
    """While refresh writes round 1, select and info read round 0, whole, and never block."""
    from gradsel.demo.tasks import write_regime

    pool, val = write_regime(tmp_path / "data", "clean", size=12, val_size=4, seed=1)
    store = tmp_path / "store"
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        "--chunk-size",
        "6",
        *SCORE,
    )
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
    lines = [
        "| command | SIGKILLs | finished rollout+vector shards at each kill | runs finished and compared | "
        "finished shards redone | outcome |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for c in chains:
        lines.append(
            f"| `{c.command}` | {c.kills} | {', '.join(c.killed_at)} | {c.completions} | {c.shards_redone} | "
            f"{'identical to the uninterrupted store' if c.identical else 'DIFFERENT'} |"
        )
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
