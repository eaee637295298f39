"""The judge's contract (issue 30, item 1): a binary judge that compares an answer with one
reference pays at most one answer class per problem, so two paid answers mean it ignored them.

Real stores of tiny-arith: one data source (arith/add2), half its rows judged by the coin flip that
stands in for a broken binary judge (reward_model.style `random`), half by the ordinary `int` rule.
"""

import json

import pyarrow.parquet as pq
import pytest

from gradsel.inputs.problems import Problem
from gradsel.rewards.registry import (
    REGISTRY,
    _verl_style,
    breaks_contract,
    paid_answers,
    promises_one_answer,
    resolve_reward,
)
from helpers import run_cli
from verl_data import write_parquet

SCORE = ["--engine", "hf", "--n", "8", "--n-val", "8", "--max-tokens", "6"]
RANDOM_WARNING = "reward random paid two or more different answers to"


def _rows(size: int, split: str, coin_flips: int = 0) -> list[dict]:
    import random

    from gradsel.demo.tasks import verl_row

    rng = random.Random(f"test-contract/{split}")
    return [
        verl_row(
            rng.randint(10, 99),
            "+",
            rng.randint(10, 99),
            domain="add2",
            split=split,
            index=i,
            style="random" if i < coin_flips else "rule",
            corrupted=i < coin_flips,
        )
        for i in range(size)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract")
    return (
        write_parquet(_rows(32, "train", coin_flips=16), out / "pool.parquet"),
        write_parquet(_rows(8, "val"), out / "val.parquet"),
    )


@pytest.fixture(scope="module")
def scored(data, tmp_path_factory):
    pool, val = data
    store = tmp_path_factory.mktemp("store") / "s"
    proc = run_cli(
        "score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store), *SCORE
    )
    return store, proc


def _scores(store) -> dict[str, dict]:
    manifest = json.loads((store / "manifest.json").read_text())
    rows = pq.read_table(store / manifest["features"] / "scores.parquet").to_pylist()
    return {r["problem_id"]: r for r in rows if r["split"] == "train"}


def _coin_flipped(pool) -> dict[str, bool]:
    from gradsel.inputs.problems import read_problems

    return {p.problem_id: bool(p.extra_info["corrupted"]) for p in read_problems(pool).problems}


def test_the_contract_catches_coin_flip_rows_and_leaves_clean_ones(data, scored):
    store, _ = scored
    scores, flipped = _scores(store), _coin_flipped(data[0])
    broken = {pid for pid, r in scores.items() if r["breaks_contract"]}
    assert broken <= {pid for pid in scores if flipped[pid]}  # no clean row ever breaks it
    assert all(r["paid_answers"] <= 1 for pid, r in scores.items() if not flipped[pid])
    mixed_flips = [pid for pid, r in scores.items() if flipped[pid] and not r["zero_advantage"]]
    assert len(broken) > len(mixed_flips) / 2, (len(broken), len(mixed_flips))
    # What the contract adds: coin-flipped rows that judge consistency alone trusted fully (no two
    # rollouts with the same answer, or every such pair paid alike).
    assert any(scores[pid]["judge_consistency"] == 1.0 for pid in broken)

    # The default selection ranks every problem breaking the contract below every clean problem
    # whose judge was consistent.
    proc = run_cli("select", "--store", str(store), "--all", "--format", "ids", "--out", "-")
    order = proc.stdout.split()
    last_clean = max(order.index(pid) for pid in order if not flipped[pid] and scores[pid]["judge_consistency"] == 1)
    assert all(order.index(pid) > last_clean for pid in broken if pid in order)


def test_a_source_breaking_it_is_warned_of_in_score_info_and_report(scored, tmp_path):
    store, proc = scored
    lines = [line for line in proc.stderr.splitlines() if RANDOM_WARNING in line]
    assert len(lines) == 1 and lines[0].startswith("warning: rollouts/train: "), proc.stderr[-3000:]
    assert "of data source 'arith/add2'" in lines[0] and "ignores the answer" in lines[0]
    assert "reward int paid" not in proc.stderr  # the clean rows of the same source: no warning

    runs = json.loads((store / "manifest.json").read_text())["rollouts"]
    contract = {c["reward"]: c for c in runs["train"]["contract"]}
    assert contract["int"]["broken"] == 0 and contract["int"]["mixed"] > 0
    assert contract["random"]["broken"] > contract["random"]["mixed"] / 2 and contract["random"]["one_answer"]
    [record] = [w for w in runs["train"]["warnings"] if w.get("reward") == "random"]
    assert record["message"] == lines[0].removeprefix("warning: ")

    info = run_cli("info", "--store", str(store))
    shares = {c["reward"]: c for c in json.loads(info.stdout)["rollouts"]["train"]["contract"]}
    assert shares["int"]["share"] == 0 and shares["random"]["share"] > 0.5
    assert "judge contract/train" in info.stderr and RANDOM_WARNING in json.loads(info.stdout)["warnings"][0]

    out = tmp_path / "report.html"
    run_cli("report", "--store", str(store), "--out", str(out))
    page = out.read_text()
    assert (
        "<h2>Judge contract</h2>" in page
        and '<tr class="broken"><td>train</td><td>arith/add2</td><td>random</td>' in page
    )


def test_check_sample_warns_of_a_source_breaking_it(data):
    proc = run_cli(
        "check",
        "--pool",
        str(data[0]),
        "--model",
        "tiny-arith",
        "--sample",
        "16",
        "--n",
        "8",
        "--engine",
        "hf",
        "--max-tokens",
        "6",
    )
    assert f"warning: check --sample 16 (train): {RANDOM_WARNING}" in proc.stderr
    assert "two answers paid" in proc.stderr
    sample = {s["reward"]: s for s in json.loads(proc.stdout)["files"][0]["sample"]}
    assert sample["random"]["contract_warning"] and sample["random"]["broken"] > sample["random"]["mixed"] / 2
    assert sample["int"]["contract_warning"] is None and sample["int"]["broken"] == 0


PLUGIN = '''
import hashlib


def coin(data_source, solution_str, ground_truth, extra_info):
    """Pays the coin-flip rows by a hash of the response, the others by the last integer."""
    if extra_info["corrupted"]:
        return float(hashlib.sha256(solution_str.encode()).digest()[0] & 1)
    found = [t for t in solution_str.replace("-", " -").split() if t.lstrip("-").isdigit()]
    return float(bool(found) and found[-1] == ground_truth)


def declared(data_source, solution_str, ground_truth, extra_info):
    return coin(data_source, solution_str, ground_truth, extra_info)


declared.gradsel_one_answer = True
'''


def test_a_judge_without_the_contract_keeps_todays_score(data, tmp_path):
    """An undeclared plugin pays two answers to a problem and is never said to break anything."""
    (tmp_path / "coinjudge.py").write_text(PLUGIN)
    pool, val = data
    store = tmp_path / "s"
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
        *SCORE,
        "--reward",
        "coinjudge:coin",
        env={"PYTHONPATH": str(tmp_path)},
    )
    scores = _scores(store)
    assert any(r["paid_answers"] > 1 for r in scores.values())  # it would break the contract, had it declared it
    assert not any(r["breaks_contract"] for r in scores.values())
    assert "paid two or more different answers" not in proc.stderr
    runs = json.loads((store / "manifest.json").read_text())["rollouts"]
    assert not any(c["one_answer"] for c in runs["train"]["contract"])
    assert json.loads(run_cli("info", "--store", str(store)).stdout)["rollouts"]["train"]["contract"] == []


def test_who_promises_the_contract(tmp_path, monkeypatch):
    (tmp_path / "coinjudge.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    routed = Problem("p", 0, "2+2=", "4", data_source="openai/gsm8k", reward_style="rule")
    unrouted = Problem("q", 1, "2+2=", "4", data_source="my/source", reward_style="rule")
    for name in ("int", "exact", "gsm8k", "math", "math_dapo", "random"):
        assert promises_one_answer(REGISTRY[name], routed)
    assert not promises_one_answer(resolve_reward(routed, "coinjudge:coin"), routed)
    assert promises_one_answer(resolve_reward(routed, "coinjudge:declared"), routed)
    verl = _verl_style("verl", lambda *args: 0.0)  # verl's routes promise it, other sources do not
    assert promises_one_answer(verl, routed) and not promises_one_answer(verl, unrouted)

    # Two paid answer classes break it; one paid class, or paid responses without an answer, do not.
    assert paid_answers([0, 1, 0, None], [1.0, 1.0, 0.0, 1.0]) == 2
    assert breaks_contract(True, [0, 1, 0], [1.0, 1.0, 0.0])
    assert not breaks_contract(True, [0, 1, 0, None], [1.0, 0.0, 1.0, 1.0])
    assert not breaks_contract(True, [0, 1], [1.0, -1.0])  # math_dapo's unpaid get -1
    assert not breaks_contract(False, [0, 1, 0], [1.0, 1.0, 0.0])
