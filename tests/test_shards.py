"""`--shard i/N`: processes sharing one store make disjoint shards, and a plain run afterwards
computes nothing twice and writes exactly the scores of a one-process run."""

import json
import os
import subprocess

from gradsel.demo.tasks import write_regime
from helpers import GRADSEL, ONE_THREAD, assert_same_features, run_cli


def markers(store):
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("shard-*.done.json")}


def test_two_concurrent_parts_then_a_plain_run_equal_one_process(tmp_path):
    write_regime(tmp_path / "data", "clean", size=64, val_size=12, seed=2)
    args = [
        "--model",
        "tiny-arith",
        "--pool",
        str(tmp_path / "data/pool.parquet"),
        "--val",
        str(tmp_path / "data/val.parquet"),
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        "--n",
        "6",
        "--shard-size",
        "16",
    ]
    run_cli("score", *args, "--store", str(tmp_path / "one"), env=ONE_THREAD)

    shared = tmp_path / "shared"
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    parts = [
        subprocess.Popen(
            [*GRADSEL, "score", *args, "--store", str(shared), "--shard", f"{i}/2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in parts:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out)["part"] in ("0/2", "1/2")
    features = next((shared / "features").iterdir())
    assert not (features / "scores.parquet").exists()  # the scores wait for a run without --shard
    made = markers(shared)
    assert len([m for m in made if m.startswith("rollouts/train/")]) == 4
    assert len([m for m in made if m.startswith(f"features/{features.name}/train/")]) == 4
    assert not any(m.startswith(("rollouts/val/", f"features/{features.name}/val/")) for m in made)

    run_cli("score", *args, "--store", str(shared), env=ONE_THREAD)
    after = markers(shared)
    assert {m: t for m, t in after.items() if m in made} == made  # no train shard made twice
    reference = next((tmp_path / "one" / "features").iterdir())
    assert reference.name == features.name
    assert_same_features(features, reference)


def test_rollout_parts_fill_one_stage(tmp_path):
    write_regime(tmp_path / "data", "clean", size=40, val_size=4, seed=3)
    args = [
        "--model",
        "tiny-arith",
        "--problems",
        str(tmp_path / "data/pool.parquet"),
        "--store",
        str(tmp_path / "s"),
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        "--n",
        "4",
        "--shard-size",
        "8",
    ]
    first = json.loads(run_cli("rollout", *args, "--shard", "1/2").stdout)
    assert first == {"store": str(tmp_path / "s"), "split": "train", "part": "1/2", "shards": 5, "shards_done": 2}
    assert not (tmp_path / "s/rollouts/train/stage.json").exists()
    second = json.loads(run_cli("rollout", *args, "--shard", "0/2").stdout)
    assert second["problems"] == 40 and second["rollouts"] == 160  # the last part completes the stage
    assert json.loads((tmp_path / "s/rollouts/train/stage.json").read_text())["rollouts"] == 160
    bad = run_cli("rollout", *args, "--shard", "2/2", check=False)
    assert bad.returncode != 0 and "--shard" in bad.stderr and "0 <= I < N" in bad.stderr
