import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from gradsel.problems import read_problems
from gradsel.schema import VERL_PROBLEMS
from gradsel.tasks import DOMAINS, REGIMES, answer_of, make_regime


@pytest.mark.parametrize("regime", REGIMES)
def test_regime_schema_round_trip(tmp_path, regime):
    run_cli("demo-data", "--out", str(tmp_path), "--regime", regime, "--size", "80", "--val-size", "10")
    pool = pq.read_table(tmp_path / "pool.parquet")
    val = pq.read_table(tmp_path / "val.parquet")
    assert pool.schema.equals(VERL_PROBLEMS) and val.schema.equals(VERL_PROBLEMS)
    assert (pool.num_rows, val.num_rows) == (80, 10)
    expected_pool, expected_val = make_regime(regime, size=80, val_size=10)
    assert pool.to_pylist() == expected_pool and val.to_pylist() == expected_val
    indices = [r["extra_info"]["index"] for r in expected_pool + expected_val]
    assert len(set(indices)) == len(indices)
    for row in expected_pool + expected_val:
        text = row["prompt"][0]["content"]
        a, op, b = _parse(text)
        assert row["reward_model"]["ground_truth"] == str(answer_of(a, op, b))
    assert all(not r["extra_info"]["corrupted"] for r in expected_val)
    problems = read_problems(tmp_path / "pool.parquet").problems
    assert [p.problem_id for p in problems] == [f"{r['data_source']}:{i}" for i, r in enumerate(expected_pool)]


def _parse(text: str):
    assert text.endswith("=")
    body = text[:-1]
    for op in "+-*":
        if op in body[1:]:
            i = body.index(op, 1)
            return int(body[:i]), op, int(body[i + 1:])
    raise AssertionError(text)


def test_same_seed_gives_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        run_cli("demo-data", "--out", str(tmp_path / name), "--regime", "noisy", "--seed", "3")
    for f in ("pool.parquet", "val.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    run_cli("demo-data", "--out", str(tmp_path / "c"), "--regime", "noisy", "--seed", "4")
    assert (tmp_path / "a/pool.parquet").read_bytes() != (tmp_path / "c/pool.parquet").read_bytes()


def test_regime_labels():
    pool, _ = make_regime("noisy", size=200)
    corrupted = [r for r in pool if r["extra_info"]["corrupted"]]
    assert len(corrupted) == 100 and all(r["reward_model"]["style"] == "random" for r in corrupted)
    pool, val = make_regime("imbalance", size=200)
    assert sum(r["extra_info"]["target"] for r in pool) == 20
    assert all(r["data_source"] == "arith/sub2" for r in val)
    assert all(r["data_source"] == "arith/sub2" for r in pool if r["extra_info"]["target"])
    pool, _ = make_regime("low-utility", size=200)
    low = [r for r in pool if r["extra_info"]["low_utility"]]
    assert len(low) == 100 and all(r["data_source"] == "arith/identity" for r in low)
    assert {r["data_source"] for r in pool if not r["extra_info"]["low_utility"]} <= {f"arith/{d}" for d in DOMAINS}
