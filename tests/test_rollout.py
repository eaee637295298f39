"""Rollout stage: engines, exact token records, rewards, the store and resuming."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradsel.core.schema import ROLLOUTS
from gradsel.inputs.models import load_tokenizer
from gradsel.inputs.problems import read_problems
from gradsel.inputs.snapshot import snapshot_into_store
from gradsel.rollout.stage import SamplingConfig, run_rollout_stage
from gradsel.store.directory import open_store
from helpers import run_cli


def rollout_into(store_dir, pool, n=4, split="train"):
    store = open_store(store_dir)
    snap = snapshot_into_store(store, "tiny-arith")
    return run_rollout_stage(
        store,
        split,
        read_problems(pool),
        model_path=Path(snap.path),
        model_hash=snap.content_hash,
        cfg=SamplingConfig(n=n, max_tokens=8, seed=1),
        engine="hf",
        shard_size=16,
    ).table()


def check_rollout_records(table, pool, n):
    tok = load_tokenizer("tiny-arith")
    problems = {p.problem_id: p for p in read_problems(pool).problems}
    assert table.schema.equals(ROLLOUTS)
    assert table.num_rows == n * len(problems)
    for row in table.to_pylist():
        p = problems[row["problem_id"]]
        assert row["prompt_token_ids"] == tok(p.prompt[0]["content"], add_special_tokens=False)["input_ids"]
        resp = row["response_token_ids"]
        assert tok.decode(resp, skip_special_tokens=True) == row["response_text"]
        assert row["finish_reason"] in {"stop", "length"}
        assert (resp[-1] == tok.eos_token_id) == (row["finish_reason"] == "stop")
        assert len(row["response_logprobs"]) == len(resp) and all(lp <= 0 for lp in row["response_logprobs"])
        if p.reward_style == "rule":
            assert row["reward"] == float(row["response_text"].strip() == p.ground_truth)
        assert row["reward"] in (0.0, 1.0)


def test_hf_rollouts_are_exact_and_reproducible(tmp_path, noisy_data):
    pool = noisy_data / "pool.parquet"
    first = rollout_into(tmp_path / "a", pool)
    check_rollout_records(first, pool, n=4)
    second = rollout_into(tmp_path / "b", pool)
    assert first.equals(second)
    rewards = first.column("reward").to_pylist()
    assert 0 < sum(rewards) < len(rewards)


def test_resume_after_lost_and_corrupt_shards(tmp_path, noisy_data):
    pool = noisy_data / "pool.parquet"
    reference = rollout_into(tmp_path / "s", pool)
    stage = tmp_path / "s/rollouts/train"
    (stage / "stage.json").unlink()
    (stage / "shard-00001.parquet").unlink()  # lost in flight: marker left, data gone
    (stage / "shard-00002.parquet").write_bytes(b"truncated")  # damaged: checksum mismatch
    (stage / "shard-00003.done.json").unlink()  # killed before its marker was written
    again = rollout_into(tmp_path / "s", pool)
    assert again.equals(reference)
    assert json.loads((stage / "stage.json").read_text())["rollouts"] == reference.num_rows


def test_store_refuses_other_inputs(tmp_path, noisy_data):
    rollout_into(tmp_path / "s", noisy_data / "pool.parquet")
    proc = run_cli(
        "rollout",
        "--model",
        "tiny-arith",
        "--problems",
        str(noisy_data / "pool.parquet"),
        "--store",
        str(tmp_path / "s"),
        "--n",
        "3",
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        check=False,
    )
    assert proc.returncode == 2 and "different inputs" in proc.stderr


def test_rollout_cli_with_openrlhf_jsonl_and_plugin_reward(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"input": f"{a}+{a}=", "label": 2 * a}) + "\n" for a in range(1, 9)))
    (tmp_path / "myjudge.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info):\n"
        "    return float(solution_str.strip() == ground_truth)\n"
    )
    proc = run_cli(
        "rollout",
        "--model",
        "tiny-arith",
        "--problems",
        str(pool),
        "--store",
        str(tmp_path / "s"),
        "--n",
        "4",
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        "--reward",
        "myjudge:compute_score",
        env={"PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
    )
    summary = json.loads(proc.stdout)
    assert summary["problems"] == 8 and summary["rollouts"] == 32
    table = pq.read_table(tmp_path / "s/rollouts/train/shard-00000.parquet")
    assert table.num_rows == 32
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert manifest["snapshot"]["content_hash"].startswith("sha256:")


@pytest.mark.slow
def test_vllm_rollouts_record_generated_tokens(tmp_path, noisy_data):
    pytest.importorskip("vllm")
    pool = noisy_data / "pool.parquet"
    proc = run_cli(
        "rollout",
        "--model",
        "tiny-arith",
        "--problems",
        str(pool),
        "--store",
        str(tmp_path / "s"),
        "--n",
        "4",
        "--engine",
        "vllm",
        "--max-tokens",
        "8",
        "--seed",
        "1",
        "--gpu-memory-utilization",
        "0.25",
        "--max-model-len",
        "64",
    )  # passed through to vLLM
    assert json.loads(proc.stdout)["rollouts"] == 4 * 60
    shards = sorted((tmp_path / "s/rollouts/train").glob("shard-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in shards])
    check_rollout_records(table, pool, n=4)


def test_bad_inputs_exit_2_and_keep_finished_work(tmp_path, noisy_data):
    pool = noisy_data / "pool.parquet"
    rollout_into(tmp_path / "s", pool)
    before = sorted(p.name for p in (tmp_path / "s").rglob("*"))
    common = ["--store", str(tmp_path / "s"), "--n", "4", "--engine", "hf", "--max-tokens", "8", "--seed", "1"]
    bad_style = tmp_path / "style.jsonl"
    bad_style.write_text(json.dumps({"prompt": "1+1=", "reward_model": {"style": "judge", "ground_truth": "2"}}) + "\n")
    cases = [
        (["--model", str(tmp_path / "missing"), "--problems", str(pool)], "is not a directory"),
        (["--model", "tiny-arith", "--problems", str(bad_style), "--split", "val"], "unknown reward style"),
        (["--model", "tiny-arith", "--problems", str(tmp_path / "none.parquet")], "does not exist"),
    ]
    for args, needle in cases:
        proc = run_cli("rollout", *args, *common, check=False)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr
    # The writers' lock file stays (filelock never deletes it, docs/store.md); nothing else may appear.
    assert sorted(p.name for p in (tmp_path / "s").rglob("*") if "val" not in p.parts and p.name != ".lock") == before


def test_max_model_len_refuses_longer_prompts_before_any_rollout(tmp_path, noisy_data):
    """--max-model-len is vLLM's context: a prompt that leaves no room in it is refused up front,
    with the problems named, whatever the engine, and the store keeps no shard."""
    pool = noisy_data / "pool.parquet"
    args = [
        "rollout",
        "--model",
        "tiny-arith",
        "--problems",
        str(pool),
        "--store",
        str(tmp_path / "s"),
        "--n",
        "2",
        "--engine",
        "hf",
        "--max-tokens",
        "4",
    ]
    proc = run_cli(*args, "--max-model-len", "5", check=False)
    assert proc.returncode == 2 and "exceed 4 tokens" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "s").rglob("shard-*.parquet"))
    assert json.loads(run_cli(*args, "--max-model-len", "64").stdout)["rollouts"] == 2 * 60


def test_hf_engine_prefills_each_prompt_once_and_is_deterministic(noisy_data):
    """A problem's k rollouts come from one forward pass over its prompt (observed by a hook on the
    real model's forward), and the same prompts and seeds give the same rollouts, whatever else
    shares the batch."""
    from gradsel.inputs.models import resolve_model_path
    from gradsel.rollout.prompts import encode_prompts
    from gradsel.rollout.stage import HFEngine, problem_seed

    engine = HFEngine(resolve_model_path("tiny-arith"))
    problems = read_problems(noisy_data / "pool.parquet").problems[:5]
    prompts = encode_prompts(engine.tokenizer, problems)
    seeds = [problem_seed(0, p.problem_id) for p in problems]
    cfg = SamplingConfig(n=6, max_tokens=8, seed=0)
    prompt_passes = []  # (rows, tokens) of every forward over more than one position: a prefill

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            prompt_passes.append(tuple(ids.shape))

    handle = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        first = engine.generate(prompts, seeds, cfg)
    finally:
        handle.remove()
    assert prompt_passes == [(1, len(ids) - 1) for ids in prompts]  # before: (6, len(ids)) per prompt
    assert [len(gens) for gens in first] == [6] * len(problems)
    assert len({tuple(g.response_token_ids) for gens in first for g in gens}) > 1  # sampled, not copied
    assert engine.generate(prompts, seeds, cfg) == first
    assert engine.generate(prompts[2:3], seeds[2:3], cfg) == first[2:3]
