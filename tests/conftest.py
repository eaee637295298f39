import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADSEL = [sys.executable, "-m", "gradsel.cli"]


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real `gradsel` CLI in a subprocess (no network, no colour)."""
    full_env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([*GRADSEL, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gradsel {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


# One torch thread per process, for runs whose features are compared byte for byte: parts running
# side by side (two processes spinning on two cores would crawl) and Ray's CPU tasks use one, and
# a reduction split across another thread count may round differently.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def assert_same_features(found: Path, reference: Path) -> None:
    """Two feature directories hold the same scores and byte-identical vector shards."""
    import pyarrow.parquet as pq

    assert pq.read_table(found / "scores.parquet").equals(pq.read_table(reference / "scores.parquet"))
    for split in ("train", "val"):
        for shard in sorted((reference / split).glob("shard-*.parquet")):
            assert (found / split / shard.name).read_bytes() == shard.read_bytes(), shard


@pytest.fixture(scope="session")
def noisy_data(tmp_path_factory) -> Path:
    from gradsel.demo.tasks import write_regime

    out = tmp_path_factory.mktemp("noisy")
    write_regime(out, "noisy", size=60, val_size=12, seed=0)
    return out
