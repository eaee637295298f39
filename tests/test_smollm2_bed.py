"""The SmolLM2 test bed's pools (benchmarks/smollm2_bed.py), without the model: verl GSM8K chat
rows judged by the gsm8k rule, the regimes' bad rows where their truth says, reproducible."""

import json

from benchmarks import smollm2_bed
from benchmarks.truth import regime_truth
from gradsel.inputs.problems import read_problems
from gradsel.rewards.registry import promises_one_answer, resolve_reward


def test_wrong_answer_pool_is_read_judged_and_its_truth_kept_aside(tmp_path):
    pool, val = smollm2_bed.write_regime(tmp_path, "wrong-answer", size=20, val_size=4, seed=3)
    problems = read_problems(pool).problems
    assert len(problems) == 20 and len(read_problems(val).problems) == 4
    truth = regime_truth(tmp_path, "wrong-answer")
    wrong = {pid for pid, right in truth.items() if not right}
    assert len(wrong) == 8  # 40% of the pool
    for p in problems:
        judge = resolve_reward(p)
        assert judge.name == "gsm8k" and promises_one_answer(judge, p)
        right = smollm2_bed.true_answer(p.messages())
        assert (p.ground_truth != right) == (p.problem_id in wrong)
        # The judge pays the true sum's `#### N` exactly where the key is right.
        assert judge(p, f"{right}\n#### {right}", 0, 0) == float(p.problem_id not in wrong)
    # Nothing in the rows says which keys are wrong; the side file does.
    assert set(json.loads((tmp_path / "pool.truth.json").read_text())["wrong_answer_ids"]) == wrong


def test_noisy_pool_flips_coins_on_its_share_and_is_reproducible(tmp_path):
    rows, _ = smollm2_bed.make_regime("noisy", size=20, val_size=2, seed=1, noise_fraction=0.4)
    assert rows == smollm2_bed.make_regime("noisy", size=20, val_size=2, seed=1, noise_fraction=0.4)[0]
    assert sum(r["reward_model"]["style"] == "random" for r in rows) == 8
    assert all(r["extra_info"]["corrupted"] == (r["reward_model"]["style"] == "random") for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" and r["data_source"] == "openai/gsm8k" for r in rows)
