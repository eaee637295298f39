import math

import pytest

from gradsel.core.errors import GradselError
from gradsel.inputs.problems import Problem
from gradsel.rewards.registry import resolve_reward


def problem(answer="42", style="rule", source="arith/add2"):
    return Problem("p1", 0, "40+2=", answer, data_source=source, reward_style=style)


def test_routing_by_style_and_data_source():
    assert resolve_reward(problem())(problem(), "42", 0, 0) == 1.0
    assert resolve_reward(problem())(problem(), "41", 0, 0) == 0.0
    assert resolve_reward(problem(answer="-7"))(problem(answer="-7"), "-7", 0, 0) == 1.0
    exact = problem(source="other", style="exact")
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
    p = problem(answer="\\frac{1}{2}", source="lighteval/MATH", style="")
    fn = resolve_reward(p)
    assert fn(p, "so the answer is $\\boxed{0.5}$", 0, 0) == 1.0
    assert fn(p, "$\\boxed{3}$", 0, 0) == 0.0


def test_plugin_rewards_and_their_failures(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text(
        "def ok(data_source, solution_str, ground_truth, extra_info):\n"
        "    return {'score': float(solution_str.strip() == ground_truth)}\n"
        "def boom(*a):\n    raise RuntimeError('judge down')\n"
        "def nan(*a):\n    return float('nan')\n"
        "def text(*a):\n    return 'yes'\n"
    )
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
    from gradsel.rewards.registry import final_answer, judge_consistency

    assert final_answer("so $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert final_answer("x = 12, so -7") == "-7" and final_answer("Yes  Sir") == "yes sir"
    assert judge_consistency([5, 5, 5], [1, 1, 1]) == 1.0  # a deterministic judge
    assert judge_consistency([5, 6], [1, 0]) == 1.0  # no two answers match: nothing to check
    assert judge_consistency([5, 5, 6, 6], [1, 0, 0, 0]) == 0.5  # one of two matching pairs disagrees
    assert judge_consistency([None, None, 1], [1, 0, 1]) == 1.0  # responses without an answer are not compared


# -- verl's data sources, exactly as verl's own preprocessing writes them ----------------------

GSM8K_SUFFIX = 'Let\'s think step by step and output the final answer after "####".'


def verl_problem(source, answer, style="rule"):
    return Problem(
        "0",
        0,
        [{"role": "user", "content": "q " + GSM8K_SUFFIX}],
        answer,
        data_source=source,
        reward_style=style,
        extra_info={"split": "train", "index": 0},
    )


def test_gsm8k_is_verl_strict_rule():
    p = verl_problem("openai/gsm8k", "72")
    judge = resolve_reward(p)
    assert judge.name == "gsm8k"
    assert judge(p, "She sold 48 + 24 = 72 clips.\n#### 72", 0, 0) == 1.0
    assert judge(p, "#### 7,2", 0, 0) == 1.0  # commas dropped, as verl does
    assert judge(p, "#### 70 ... no, #### 72", 0, 0) == 1.0  # the last #### counts
    assert judge(p, "The answer is 72.", 0, 0) == 0.0  # no #### : verl pays 0, so must we
    assert judge(p, "#### 71", 0, 0) == 0.0


@pytest.mark.parametrize(
    "source",
    [
        "lighteval/MATH",
        "DigitalLearningGmbH/MATH-lighteval",
        "HuggingFaceH4/MATH-500",
        "numina_cn_k12",
        "numina_olympiads",
        "numina_amc_aime",
    ],
)
def test_math_sources_check_the_boxed_answer_mathematically(source):
    pytest.importorskip("math_verify")
    p = verl_problem(source, "\\frac{\\sqrt{2}}{2}")
    judge = resolve_reward(p)
    assert judge.name == "math"
    assert judge(p, "so $\\boxed{\\frac{\\sqrt{2}}{2}}$", 0, 0) == 1.0
    assert judge(p, "so $\\boxed{\\frac{1}{\\sqrt{2}}}$", 0, 0) == 1.0
    assert judge(p, "so $\\boxed{\\frac{\\sqrt{3}}{2}}$", 0, 0) == 0.0
    assert judge(p, "the answer is \\frac{\\sqrt{2}}{2}", 0, 0) == 0.0  # unboxed: verl's MATH rule pays 0


@pytest.mark.parametrize("source", ["math_dapo", "aime2024", "aime25"])
def test_dapo_sources_pay_plus_or_minus_one(source):
    pytest.importorskip("math_verify")
    p = verl_problem(source, "34")
    judge = resolve_reward(p)
    assert judge.name == "math_dapo"
    assert judge(p, "work...\nAnswer: 34", 0, 0) == 1.0
    assert judge(p, "work...\nAnswer: 35", 0, 0) == -1.0
    assert judge(p, "no answer line", 0, 0) == -1.0


def test_an_unrouted_data_source_is_refused_with_its_row_count():
    from gradsel.rewards.registry import check_rewards

    rows = [verl_problem("my_org/gsm_hard", "1") for _ in range(3)] + [verl_problem("openai/gsm8k", "1")]
    with pytest.raises(GradselError, match=r"'my_org/gsm_hard' \(3 rows") as err:
        check_rewards(rows)
    assert "--reward" in err.value.hint and "openai/gsm8k" in err.value.hint
    assert check_rewards(rows, "int") == {"my_org/gsm_hard": {"int": 3}, "openai/gsm8k": {"int": 1}}
    assert check_rewards(rows[3:]) == {"openai/gsm8k": {"gsm8k": 1}}


def test_an_unparsable_math_reference_is_refused():
    pytest.importorskip("math_verify")
    from gradsel.rewards.registry import check_rewards

    with pytest.raises(GradselError, match="cannot parse the reference answer"):
        check_rewards([verl_problem("lighteval/MATH", "\\frac{")])


def test_reward_verl_names_what_is_missing():
    from gradsel.rewards.registry import _override

    try:
        import verl.utils.reward_score  # noqa: F401
    except ImportError:
        with pytest.raises(GradselError, match="verl is not importable"):
            _override("verl")
    else:
        p = verl_problem("openai/gsm8k", "72")
        assert resolve_reward(p, "verl")(p, "#### 72", 0, 0) == 1.0


# -- answer equivalence for judge consistency ----------------------------------------------------


def test_math_answers_are_grouped_by_equivalence():
    pytest.importorskip("math_verify")
    from gradsel.rewards.registry import answer_classes

    p = verl_problem("lighteval/MATH", "\\frac{1}{2}")
    judge = resolve_reward(p)
    responses = [
        "$\\boxed{1/2}$",
        "$\\boxed{0.5}$",
        "$\\boxed{\\frac{1}{2}}$",
        "$\\boxed{3/2}$",
        "$\\boxed{\\frac{\\sqrt{2}}{2}}$",
        "$\\boxed{\\frac{\\sqrt{3}}{2}}$",
        "no box",
        "$\\boxed{\\frac{1}{\\sqrt{2}}}$",
        "$\\boxed{x^2+1}$",
        "$\\boxed{1+x^{2}}$",
        "$\\boxed{x^2-1}$",
    ]
    c = answer_classes(judge, p, responses)
    assert c[0] == c[1] == c[2]
    assert len({c[2], c[3], c[4], c[5]}) == 4
    assert c[6] is None
    assert c[7] == c[4]  # equal values key alike, without a pairwise check
    assert c[8] == c[9] != c[10]  # symbolic answers are compared pairwise by math-verify


def test_gsm8k_and_plugin_answers_use_the_routes_extraction(tmp_path, monkeypatch):
    from gradsel.rewards.registry import answer_classes

    p = verl_problem("openai/gsm8k", "72")
    responses = ["so 3 apples\n#### 72", "7 cats\n#### 72", "#### 70", "no answer here 72"]
    # The generic key would read "72", "72", "70", "72"; gsm8k's own extraction sees no answer in the last.
    assert answer_classes(resolve_reward(p), p, responses) == [0, 0, 1, None]
    (tmp_path / "judge.py").write_text("def score(ds, text, gt, extra):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert answer_classes(resolve_reward(p, "judge:score"), p, responses) == [0, 0, 1, None]
