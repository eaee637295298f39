"""Rewards: a registry keyed by `reward_model.style` and `data_source`, plus verl-style plugins.

A plugin is `module:function` with verl's signature
`compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`
so a team's existing verl reward functions work unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from collections.abc import Callable

from gradsel.errors import GradselError, missing_extra
from gradsel.problems import Problem

# (problem, response text, sample index, seed) -> reward
RewardFn = Callable[[Problem, str, int, int], float]

_INT = re.compile(r"-?\d+")


def int_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """1.0 when the last integer in the response equals the reference integer."""
    found = _INT.findall(response.replace(",", ""))
    try:
        return float(bool(found) and int(found[-1]) == int(problem.ground_truth.strip()))
    except ValueError:
        return 0.0


def exact_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    return float(response.strip() == problem.ground_truth.strip())


def random_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """The coin-flip judge of the noisy regime: independent of the response, but reproducible."""
    digest = hashlib.sha256(f"{seed}/{problem.problem_id}/{sample}".encode()).digest()
    return float(digest[0] & 1)


def math_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise missing_extra("math-verify", "math") from exc
    gold = parse(problem.ground_truth if "$" in problem.ground_truth or "\\boxed" in problem.ground_truth
                 else f"${problem.ground_truth}$")
    return float(verify(gold, parse(response)))


REGISTRY: dict[str, RewardFn] = {
    "int": int_reward,
    "exact": exact_reward,
    "random": random_reward,
    "math": math_reward,
}
# verl's generic styles: the reward is then chosen by data_source, as verl's default_compute_score does.
RULE_STYLES = ("", "rule")
# data_source prefixes routed to a reward when the style names none of the registry's keys.
DATA_SOURCE_ROUTES = (("arith", "int"), ("math", "math"), ("gsm", "math"), ("aime", "math"), ("amc", "math"))


def _plugin(spec: str) -> RewardFn:
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise GradselError(f"cannot import reward plugin {spec!r}: {exc}",
                           "use module:function with the module importable from the current directory") from exc

    def call(problem: Problem, response: str, sample: int, seed: int) -> float:
        try:
            out = func(problem.data_source, response, problem.ground_truth, problem.extra_info)
        except Exception as exc:  # a user's plugin can raise anything; report it, do not crash
            raise GradselError(f"reward plugin {spec} raised {type(exc).__name__}: {exc} "
                               f"(problem {problem.problem_id})", "fix the plugin; nothing was written for this shard") from exc
        if isinstance(out, dict):
            out = out.get("score")
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            raise GradselError(f"reward plugin {spec} returned {type(out).__name__}, not a number "
                               f"(problem {problem.problem_id})", "return a float, or a dict with a 'score' float")
        if not math.isfinite(out):
            raise GradselError(f"reward plugin {spec} returned {out} (problem {problem.problem_id})",
                               "rewards must be finite numbers")
        return float(out)

    return call


_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def final_answer(response: str) -> str:
    """The answer a response commits to, for comparing responses: the last \\boxed{...}, else
    the last number, else the whitespace-normalised text."""
    boxed = _BOXED.findall(response)
    if boxed:
        return " ".join(boxed[-1].split())
    numbers = _INT.findall(response.replace(",", ""))
    if numbers:
        return numbers[-1]
    return " ".join(response.split()).lower()


def judge_consistency(responses: list[str], rewards: list[float]) -> float:
    """1 - (pairs with the same final answer but different rewards) / (pairs with the same
    final answer); 1.0 when no two responses share an answer."""
    by_answer: dict[str, list[float]] = {}
    for text, r in zip(responses, rewards):
        by_answer.setdefault(final_answer(text), []).append(r)
    same = conflict = 0
    for rs in by_answer.values():
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                same += 1
                conflict += rs[i] != rs[j]
    return 1.0 - conflict / same if same else 1.0


def resolve_reward(problem: Problem, override: str | None = None) -> RewardFn:
    """Pick the reward for one problem: --reward, else its style, else its data_source."""
    if override:
        if ":" in override:
            return _plugin(override)
        if override not in REGISTRY:
            raise GradselError(f"unknown reward {override!r}",
                               f"choose one of {', '.join(REGISTRY)} or give module:function")
        return REGISTRY[override]
    if problem.reward_style in REGISTRY:
        return REGISTRY[problem.reward_style]
    if problem.reward_style not in RULE_STYLES:
        raise GradselError(f"unknown reward style {problem.reward_style!r} (problem {problem.problem_id})",
                           f"styles gradsel knows: {', '.join([*REGISTRY, *RULE_STYLES[1:]])}; "
                           "or pass --reward NAME or --reward module:function")
    source = problem.data_source.lower()
    for prefix, name in DATA_SOURCE_ROUTES:
        if source.startswith(prefix):
            return REGISTRY[name]
    return REGISTRY["exact"]
