import json

import pyarrow.parquet as pq
import pytest

from gradsel.core.schema import verl_problems
from gradsel.demo.tasks import DEMO_EXTRA_INFO, DOMAINS, REGIMES, answer_of, make_regime, write_regime
from gradsel.inputs.problems import read_problems
from helpers import run_cli


@pytest.mark.parametrize("regime", REGIMES)
def test_regime_schema_round_trip(tmp_path, regime):
    run_cli("demo-data", "--out", str(tmp_path), "--regime", regime, "--size", "80", "--val-size", "10")
    pool = pq.read_table(tmp_path / "pool.parquet")
    val = pq.read_table(tmp_path / "val.parquet")
    schema = verl_problems(DEMO_EXTRA_INFO)
    assert pool.schema.equals(schema) and val.schema.equals(schema)
    assert (pool.num_rows, val.num_rows) == (80, 10)
    expected_pool, expected_val = make_regime(regime, size=80, val_size=10)
    assert pool.to_pylist() == expected_pool and val.to_pylist() == expected_val
    indices = [r["extra_info"]["index"] for r in expected_pool + expected_val]
    assert len(set(indices)) == len(indices)
    wrong = set()
    if regime == "wrong-answer":  # its wrong labels are listed beside the pool (tested below)
        wrong = set(json.loads((tmp_path / "pool.truth.json").read_text())["wrong_answer_ids"])
    for row in expected_pool + expected_val:
        text = row["prompt"][0]["content"]
        a, op, b = _parse(text)
        labelled_right = row["reward_model"]["ground_truth"] == str(answer_of(a, op, b))
        assert labelled_right != (f"{row['data_source']}:{row['extra_info']['index']}" in wrong)
    assert all(not r["extra_info"]["corrupted"] for r in expected_val)
    problems = read_problems(tmp_path / "pool.parquet").problems
    assert [p.problem_id for p in problems] == [f"{r['data_source']}:{i}" for i, r in enumerate(expected_pool)]


def _parse(text: str):
    assert text.endswith("=")
    body = text[:-1]
    for op in "+-*":
        if op in body[1:]:
            i = body.index(op, 1)
            return int(body[:i]), op, int(body[i + 1 :])
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


def test_wrong_answer_regime_hides_which_rows_are_wrong(tmp_path):
    from gradsel.demo.tasks import TRUTH_FILE, parse_prompt

    pool_path, _ = write_regime(tmp_path, "wrong-answer", size=100, val_size=10, seed=0)
    truth = json.loads((tmp_path / TRUTH_FILE).read_text())
    wrong = set(truth["wrong_answer_ids"])
    assert len(wrong) == 40 and truth["pool_size"] == 100
    slips = 0
    for p in read_problems(pool_path).problems:
        a, op, b = parse_prompt(p.prompt[0]["content"])
        right = answer_of(a, op, b)
        assert (int(p.ground_truth) != right) == (p.problem_id in wrong)
        assert not any(p.extra_info[k] for k in ("corrupted", "target", "low_utility"))  # the rows do not tell
        if p.problem_id in wrong:
            diff = abs(int(p.ground_truth) - right)
            # A digit off by one (a power of ten), two digits swapped (a multiple of 9), a forgotten
            # carry (a multiple of 10); a borrow slip (each column's smaller digit from its larger)
            # can be anything.
            assert diff in (1, 10, 100, 1000) or diff % 9 == 0 or diff % 10 == 0 or op == "-"
            slips += diff % 10 == 0 or op == "-"
    assert slips > 10
    assert write_regime(tmp_path / "again", "wrong-answer", size=100, val_size=10, seed=0)  # byte-identical below
    assert (tmp_path / "again" / TRUTH_FILE).read_bytes() == (tmp_path / TRUTH_FILE).read_bytes()
    write_regime(tmp_path, "clean", size=10, val_size=2)
    assert not (tmp_path / TRUTH_FILE).exists()  # no stale side file beside a pool of another regime


def test_regime_truth_marks_exactly_the_wanted_rows(tmp_path):
    """The benchmarks' and the loop oracle's ground truth: what write_regime made, read back."""
    from benchmarks.truth import regime_truth
    from gradsel.demo.tasks import parse_prompt

    for regime, size in (("noisy", 60), ("low-utility", 60), ("imbalance", 60), ("wrong-answer", 60)):
        write_regime(tmp_path / regime, regime, size=size, val_size=5, seed=3)
        truth = regime_truth(tmp_path / regime, regime)
        problems = read_problems(tmp_path / regime / "pool.parquet").problems
        assert set(truth) == {p.problem_id for p in problems}
        for p in problems:
            a, op, b = parse_prompt(p.prompt[0]["content"])
            expected = {
                "noisy": p.reward_style != "random",
                "low-utility": p.data_source != "arith/identity",
                "imbalance": p.data_source == "arith/sub2",
                "wrong-answer": p.ground_truth == str(answer_of(a, op, b)),
            }[regime]
            assert truth[p.problem_id] == expected, (regime, p.problem_id)
        assert 0 < sum(truth.values()) < size


def test_model_written_wrong_keys_are_answers_the_model_gives(tmp_path):
    """benchmarks/quality.py --wrong-keys model: each wrong key is the model's own commonest wrong
    answer, so unlike most slips the model writes it: a wrongly keyed row then has a GRPO signal."""
    import torch

    from benchmarks.truth import model_wrong_key
    from gradsel.demo.tasks import TRUTH_FILE, parse_prompt, prompt_text
    from gradsel.inputs.models import load_causal_lm, load_tokenizer

    write_regime(tmp_path, "wrong-answer", size=30, val_size=2, seed=1, wrong_key=model_wrong_key("tiny-arith"))
    wrong = set(json.loads((tmp_path / TRUTH_FILE).read_text())["wrong_answer_ids"])
    assert len(wrong) == 12
    tok, lm = load_tokenizer("tiny-arith"), load_causal_lm("tiny-arith").eval()
    key_prob = []
    for p in read_problems(tmp_path / "pool.parquet").problems:
        if p.problem_id not in wrong:
            continue
        a, op, b = parse_prompt(p.prompt[0]["content"])
        assert int(p.ground_truth) != answer_of(a, op, b)
        # The key's probability under the model (teacher-forced, EOS included).
        ids = tok(prompt_text(a, op, b), add_special_tokens=False)["input_ids"]
        answer = tok(p.ground_truth, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = lm(torch.tensor([ids + answer])).logits.log_softmax(-1)[0]
        key_prob.append(float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(answer)).exp()))
    assert sum(q > 0.02 for q in key_prob) >= 10, key_prob  # the model writes it in at least 1 of 50 samples
    write_regime(
        tmp_path / "again", "wrong-answer", size=30, val_size=2, seed=1, wrong_key=model_wrong_key("tiny-arith")
    )
    assert (tmp_path / "again" / "pool.parquet").read_bytes() == (tmp_path / "pool.parquet").read_bytes()
