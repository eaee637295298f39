from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gradsel.demo.tasks import write_regime
from helpers import QUICK_SCORE, run_cli, write_odd_jsonl
from verl_data import write_parquet


@pytest.fixture(scope="session")
def noisy_data(tmp_path_factory) -> Path:
    from gradsel.demo.tasks import write_regime

    out = tmp_path_factory.mktemp("noisy")
    write_regime(out, "noisy", size=60, val_size=12, seed=0)
    return out


@pytest.fixture(scope="session")
def odd_jsonl_store(tmp_path_factory):
    """A pool in odd JSONL and a validation Parquet whose extra_info.index both count from 0, as
    verl's train and test files do; odd_jsonl_store once."""
    d = tmp_path_factory.mktemp("defects")
    pool_parquet, val_parquet = write_regime(d / "data", "clean", size=30, val_size=16, seed=2)
    val_rows = pq.read_table(val_parquet).to_pylist()
    for j, row in enumerate(val_rows):  # numbered from 0, like the pool: the ids collide across splits
        row["extra_info"]["index"] = j
    val = write_parquet(val_rows, d / "val.parquet")
    pool_rows = pq.read_table(pool_parquet).to_pylist()
    pool_rows[5]["extra_info"]["index"] = str(pool_rows[5]["extra_info"]["index"])  # a string among ints
    pool = write_odd_jsonl(pool_rows, d / "pool.jsonl")
    store = d / "store"
    run_cli(
        "score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store), *QUICK_SCORE
    )
    return d, pool, val, store
