"""`gradsel score --executor ray` on a local 2-CPU Ray cluster: the same scores as one process,
also when a worker is killed mid-shard (Ray retries its part, which redoes only that shard)."""

import os

import pytest

from gradsel.demo.tasks import write_regime
from helpers import ONE_THREAD, assert_same_features, run_cli

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'gradsel[ray]'")
pytestmark = pytest.mark.slow

# A verl-style reward plugin that SIGKILLs its own process once, while rewarding problem 20's
# rollouts (shard 1 of 16-problem shards, so part 1 of 2), mid-shard.
PLUGIN = """
import os, signal
from pathlib import Path

def compute_score(data_source, solution_str, ground_truth, extra_info):
    marker = os.environ.get("KILL_ONCE_MARKER")
    if marker and extra_info["index"] == 20 and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return float(solution_str.strip() == ground_truth)
"""


def test_ray_executor_matches_one_process_after_a_killed_worker(tmp_path):
    write_regime(tmp_path / "data", "clean", size=48, val_size=8, seed=4)
    (tmp_path / "killer.py").write_text(PLUGIN)
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
        "--reward",
        "killer:compute_score",
    ]
    env = {**ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run_cli("score", *args, "--store", str(tmp_path / "one"), env=env)
    marker = tmp_path / "killed.pid"
    run_cli(
        "score",
        *args,
        "--store",
        str(tmp_path / "ray"),
        "--executor",
        "ray",
        env={**env, "KILL_ONCE_MARKER": str(marker)},
    )
    assert marker.exists()  # a worker did die mid-shard, and its part was retried
    one, ray_run = (next((tmp_path / s / "features").iterdir()) for s in ("one", "ray"))
    assert_same_features(ray_run, one)


def test_ray_executor_refuses_bad_input_before_starting_a_cluster(tmp_path):
    write_regime(tmp_path / "data", "clean", size=10, val_size=4, seed=4)
    proc = run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(tmp_path / "data/pool.parquet"),
        "--val",
        str(tmp_path / "data/val.parquet"),
        "--store",
        str(tmp_path / "s"),
        "--engine",
        "hf",
        "--executor",
        "ray",
        "--reward",
        "nosuch",
        check=False,
    )
    assert proc.returncode == 2 and "unknown reward 'nosuch'" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "s").rglob("shard-*"))
