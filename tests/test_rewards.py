import math

import pytest

from gradsel.errors import GradselError
from gradsel.problems import Problem
from gradsel.rewards import resolve_reward


def problem(answer="42", style="rule", source="arith/add2"):
    return Problem("p1", 0, "40+2=", answer, data_source=source, reward_style=style)


def test_routing_by_style_and_data_source():
    assert resolve_reward(problem())(problem(), "42", 0, 0) == 1.0
    assert resolve_reward(problem())(problem(), "41", 0, 0) == 0.0
    assert resolve_reward(problem(answer="-7"))(problem(answer="-7"), "-7", 0, 0) == 1.0
    exact = problem(source="other", style="")
    assert resolve_reward(exact)(exact, " 42 ", 0, 0) == 1.0


def test_random_judge_is_a_reproducible_coin_flip():
    p = problem(style="random")
    judge = resolve_reward(p)
    flips = [judge(p, "anything", i, 0) for i in range(200)]
    assert flips == [judge(p, "something else", i, 0) for i in range(200)]
    assert 60 < sum(flips) < 140
    assert flips != [judge(p, "x", i, 1) for i in range(200)]


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    p = problem(answer="\\frac{1}{2}", source="math/test", style="")
    fn = resolve_reward(p)
    assert fn(p, "so the answer is $\\boxed{0.5}$", 0, 0) == 1.0
    assert fn(p, "$\\boxed{3}$", 0, 0) == 0.0


def test_plugin_rewards_and_their_failures(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text(
        "def ok(data_source, solution_str, ground_truth, extra_info):\n"
        "    return {'score': float(solution_str.strip() == ground_truth)}\n"
        "def boom(*a):\n    raise RuntimeError('judge down')\n"
        "def nan(*a):\n    return float('nan')\n"
        "def text(*a):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = problem()
    assert resolve_reward(p, "myreward:ok")(p, "42", 0, 0) == 1.0
    for name, needle in (("boom", "raised RuntimeError"), ("nan", "returned nan"), ("text", "not a number")):
        with pytest.raises(GradselError, match=needle):
            resolve_reward(p, f"myreward:{name}")(p, "42", 0, 0)
    with pytest.raises(GradselError, match="cannot import"):
        resolve_reward(p, "nomodule_xyz:f")
    with pytest.raises(GradselError, match="unknown reward"):
        resolve_reward(p, "bogus")
    assert not math.isnan(resolve_reward(p, "int")(p, "42", 0, 0))


def test_unknown_style_is_refused_but_verl_rule_routes_by_source():
    with pytest.raises(GradselError, match="unknown reward style 'llm-judge'"):
        resolve_reward(problem(style="llm-judge"))
    assert resolve_reward(problem(style="rule"))(problem(), "42", 0, 0) == 1.0


def test_final_answer_and_judge_consistency():
    from gradsel.rewards import final_answer, judge_consistency

    assert final_answer("so $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert final_answer("x = 12, so -7") == "-7" and final_answer("Yes  Sir") == "yes sir"
    assert judge_consistency(["5", "5", "5"], [1, 1, 1]) == 1.0  # a deterministic judge
    assert judge_consistency(["5", "6"], [1, 0]) == 1.0  # no two answers match: nothing to check
    assert judge_consistency(["5", "5", "6", "6"], [1, 0, 0, 0]) == 0.5  # one of two matching pairs disagrees
