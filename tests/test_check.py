"""`gradsel check` and the same pre-flight inside `score`: verl-shaped rows, routed rewards,
prompt lengths, and refusals that leave nothing behind."""

import json

import pyarrow.parquet as pq

from helpers import run_cli
from verl_data import gsm8k_rows, math_rows, write_parquet


def mixed_pool(tmp_path, *, unknown: int = 0):
    rows = gsm8k_rows([(2, 3), (4, 1), (3, 3)], "train") + math_rows("train", start=3)
    rows += [
        {**r, "data_source": "my_org/word_problems", "extra_info": {**r["extra_info"], "index": 100 + i}}
        for i, r in enumerate(gsm8k_rows([(1, 1)] * unknown, "train"))
    ]
    return write_parquet(rows, tmp_path / "pool.parquet")


def test_check_reports_each_data_source_and_its_reward(tmp_path):
    pool = mixed_pool(tmp_path)
    val = write_parquet(gsm8k_rows([(1, 2), (2, 2)], "test"), tmp_path / "val.parquet")
    proc = run_cli("check", "--pool", str(pool), "--val", str(val))
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    sources = {s["data_source"]: s for s in report["files"][0]["sources"]}
    assert sources["openai/gsm8k"]["rows"] == 3 and sources["openai/gsm8k"]["rewards"] == {"gsm8k": 3}
    assert sources["DigitalLearningGmbH/MATH-lighteval"]["rewards"] == {"math": 4}
    assert "openai/gsm8k" in proc.stderr and "no problems found" in proc.stderr


def test_every_reward_of_a_data_source_is_reported_with_its_rows(tmp_path):
    """openai/gsm8k rows judged partly by a coin flip (reward_model.style random), partly by the
    gsm8k route: check, the manifest and info name both, each with its rows, not the first row's
    reward alone. A store written before, with one name per source, still reads."""
    # Short prompts: tiny-arith's context holds no GSM8K question; the reward does not care.
    rows = [
        {**r, "prompt": [{"role": "user", "content": f"{i}+1="}]}
        for i, r in enumerate(gsm8k_rows([(i, 1) for i in range(8)], "train", system=None))
    ]
    for r in rows[:3]:  # the first rows: the first-row report named only this one
        r["reward_model"] = {**r["reward_model"], "style": "random"}
    pool = write_parquet(rows, tmp_path / "pool.parquet")
    proc = run_cli("check", "--pool", str(pool))
    assert "gsm8k 5, random 3" in proc.stderr, proc.stderr
    (source,) = json.loads(proc.stdout)["files"][0]["sources"]
    assert source["data_source"] == "openai/gsm8k" and source["rows"] == 8
    assert source["rewards"] == {"gsm8k": 5, "random": 3}
    store = tmp_path / "store"
    run_cli(
        "rollout",
        "--model",
        "tiny-arith",
        "--problems",
        str(pool),
        "--store",
        str(store),
        "--n",
        "2",
        "--engine",
        "hf",
        "--max-tokens",
        "4",
    )
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["rollouts"]["train"]["rewards_by_data_source"] == {"openai/gsm8k": {"gsm8k": 5, "random": 3}}
    proc = run_cli("info", "--store", str(store))
    assert json.loads(proc.stdout)["rollouts"]["train"]["rewards"] == {"openai/gsm8k": {"gsm8k": 5, "random": 3}}
    assert "openai/gsm8k: gsm8k 5, random 3" in proc.stderr
    # The shape stores wrote before: one reward name per source, no rows.
    manifest["rollouts"]["train"]["rewards_by_data_source"] = {"openai/gsm8k": "gsm8k"}
    (store / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("info", "--store", str(store))
    assert json.loads(proc.stdout)["rollouts"]["train"]["rewards"] == {"openai/gsm8k": {"gsm8k": None}}
    assert "openai/gsm8k: gsm8k" in proc.stderr


def test_check_refuses_an_unrouted_source_and_long_prompts(tmp_path):
    pool = mixed_pool(tmp_path, unknown=2)
    # tiny-arith's context is 64 tokens: a GSM8K prompt with its system prompt does not fit.
    proc = run_cli("check", "--pool", str(pool), "--model", "tiny-arith", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no reward for data_source 'my_org/word_problems' (2 rows" in proc.stderr
    assert "--reward" in proc.stderr
    assert "exceed 63 tokens" in proc.stderr
    report = json.loads(proc.stdout)
    tokens = {s["data_source"]: s["prompt_tokens"] for s in report["files"][0]["sources"]}
    assert tokens["openai/gsm8k"][0] > 63 and tokens["openai/gsm8k"][0] <= tokens["openai/gsm8k"][2]
    proc = run_cli(
        "check", "--pool", str(pool), "--reward", "int", "--model", "tiny-arith", "--max-prompt-tokens", "4096"
    )
    assert json.loads(proc.stdout)["ok"] is True


def test_score_refuses_before_any_rollout_and_writes_nothing(tmp_path):
    pool = mixed_pool(tmp_path, unknown=1)
    val = write_parquet(gsm8k_rows([(1, 2)], "test"), tmp_path / "val.parquet")
    store = tmp_path / "store"
    proc = run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        "--engine",
        "hf",
        "--n",
        "2",
        check=False,
    )
    assert proc.returncode == 2 and "my_org/word_problems" in proc.stderr and "Traceback" not in proc.stderr
    assert not (store / "rollouts").exists()
    # Routed, but too long for tiny-arith: refused before the engine starts, no stage pinned.
    pool = write_parquet(gsm8k_rows([(2, 3)], "train"), tmp_path / "pool2.parquet")
    proc = run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        "--engine",
        "hf",
        "--n",
        "2",
        check=False,
    )
    assert proc.returncode == 2 and "exceed 63 tokens" in proc.stderr, proc.stderr
    assert not any((store / "rollouts").rglob("inputs.json"))


def test_verl_rows_keep_their_shape(tmp_path):
    path = write_parquet(gsm8k_rows([(2, 3)], "train"), tmp_path / "p.parquet")
    schema = pq.read_schema(path)
    assert schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert [f.name for f in schema.field("extra_info").type] == ["split", "index", "answer", "question"]
