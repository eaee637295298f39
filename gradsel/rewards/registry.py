"""Rewards: which judge scores a problem's responses, and what answer each response commits to.

A reward is chosen per row, as verl's `default_compute_score` chooses it: a row whose
`reward_model.style` is generic ("rule" or empty) is routed by its `data_source` through
`ROUTES` (verl's table), a row whose style names a reward of gradsel's uses that one, and
`--reward` overrides both. A data source that no route knows is refused before any rollout
(`check_rewards`): a silent fallback would pay every response 0.

A plugin is `module:function` with verl's signature
`compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`,
so a team's existing verl reward functions work unchanged; `--reward verl` calls verl's own
`default_compute_score`.

Every reward also says which answer a response commits to and when two answers are the same
(`Reward.answer`, `Reward.same`): judge consistency (scores.judge_consistency) compares the
rewards of responses that gave the same answer, so the answers must be compared the way the
judge compares them: `\\frac{1}{2}` and `0.5` are one answer to a math judge.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gradsel.core.errors import GradselError, missing_extra
from gradsel.inputs.problems import Problem

# (problem, response text, sample index, seed) -> reward
ScoreFn = Callable[[Problem, str, int, int], float]

_INT = re.compile(r"-?\d+")


def _last_int(response: str) -> str | None:
    found = _INT.findall(response.replace(",", ""))
    return found[-1] if found else None


def final_answer(response: str) -> str:
    """A generic answer key for judges whose extraction gradsel does not know (plugins, the
    coin-flip judge): the last \\boxed{...}, else the last integer, else the normalised text."""
    boxed = last_boxed(response)
    if boxed is not None:
        return " ".join(boxed.split())
    number = _last_int(response)
    if number is not None:
        return number
    return " ".join(response.split()).lower()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1 : i]
    return None


# -- math-verify -----------------------------------------------------------------------------------


def _math_verify():
    try:
        import math_verify
    except ImportError as exc:
        raise missing_extra("math-verify", "math") from exc
    return math_verify


@functools.lru_cache(maxsize=65536)
def parse_math(text: str) -> tuple:
    """math-verify's parse of one answer (LaTeX or plain); `$...$` is added when the text has no
    math delimiters, so a bare `\\frac{1}{2}` or `0.5` parses as math. Empty when it holds no
    mathematical object (math-verify then returns only the raw string)."""
    mv = _math_verify()
    delimited = "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text
    try:
        parsed = mv.parse(text if delimited else f"${text}$")
    except Exception:  # math-verify raises on some malformed LaTeX; that is "no answer"
        return ()
    return tuple(parsed) if any(not isinstance(x, str) for x in parsed) else ()


def math_key(answer: str) -> str | None:
    """A canonical key for an answer with a plain numeric value (an exact integer, else 12
    significant digits), so that equal values group without a pairwise check: `1/2`, `0.5`,
    `\\frac{1}{2}` all key as `0.5`, `\\frac{\\sqrt{2}}{2}` and `\\frac{1}{\\sqrt{2}}` alike. None for
    anything else (a variable, a set, an interval), which `math_equal` compares pairwise."""
    parsed = parse_math(answer)
    if not parsed:
        return None
    import sympy

    expr = parsed[0]
    try:
        if isinstance(expr, sympy.Integer):
            return str(int(expr))
        if isinstance(expr, sympy.Expr) and not expr.free_symbols:
            value = complex(expr.evalf(15))
            if value.imag == 0 and math.isfinite(value.real):
                return f"{value.real:.12g}"
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return None


def math_equal(gold: str, answer: str) -> bool:
    """math-verify's equivalence of two answers (`1/2` = `0.5` = `\\frac{1}{2}`)."""
    parsed_gold, parsed = parse_math(gold), parse_math(answer)
    if not parsed_gold or not parsed:
        return False
    try:
        return bool(_math_verify().verify(list(parsed_gold), list(parsed)))
    except Exception:
        return False


# -- the judges ---------------------------------------------------------------------------------


def int_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """1.0 when the last integer in the response equals the reference integer."""
    found = _last_int(response)
    try:
        return float(found is not None and int(found) == int(problem.ground_truth.strip()))
    except ValueError:
        return 0.0


def exact_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    return float(response.strip() == problem.ground_truth.strip())


def random_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """The coin-flip judge of the noisy regime: independent of the response, but reproducible."""
    digest = hashlib.sha256(f"{seed}/{problem.problem_id}/{sample}".encode()).digest()
    return float(digest[0] & 1)


# verl's judges read only the end of a long response (its longest MATH-500 answer is 159 characters).
_TAIL_CHARS = 300
_GSM8K_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
_DAPO_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def gsm8k_answer(response: str) -> str | None:
    """verl's gsm8k (strict): the number after the last `#### `, commas and `$` removed."""
    found = _GSM8K_ANSWER.findall(response[-_TAIL_CHARS:])
    return found[-1].replace(",", "").replace("$", "") if found else None


def gsm8k_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """verl's gsm8k rule: 1 when the `#### N` answer equals the reference string, else 0."""
    return float(gsm8k_answer(response) == problem.ground_truth.strip())


def math_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """The MATH rule: the last \\boxed{} answer, mathematically equal to the reference (math-verify)."""
    answer = last_boxed(response)
    return float(answer is not None and math_equal(problem.ground_truth, answer))


def dapo_answer(response: str) -> str | None:
    """verl's math_dapo: the text after the last `Answer:` in the response's tail."""
    found = _DAPO_ANSWER.findall(response[-_TAIL_CHARS:])
    return found[-1].strip() if found else None


def dapo_reward(problem: Problem, response: str, sample: int, seed: int) -> float:
    """verl's math_dapo rule, paying 1 or -1 as verl does, with math-verify's equivalence."""
    answer = dapo_answer(response)
    return 1.0 if answer is not None and math_equal(problem.ground_truth, answer) else -1.0


@dataclass(frozen=True)
class Reward:
    """One judge: its score, the answer a response commits to (None: none), and when two answers
    are the same (None: when their strings are)."""

    name: str
    score: ScoreFn
    answer: Callable[[str], str | None]
    same: Callable[[str, str], bool] | None = None
    # A canonical key where one exists (None: compare with `same`); groups k answers without
    # k^2 checks, which for math-verify cost seconds per problem at k = 64.
    key: Callable[[str], str | None] | None = None
    checks_ground_truth: bool = False  # a math judge: the reference must parse as math
    extracts: bool = True  # False for plugins: `answer` is only a generic guess
    # What the judge reads in a response, in words, required of every reward: the warning for a
    # data source that no rollout was paid on names it (payouts.py), since a model that never
    # writes that form is never paid.
    answer_form: str = field(kw_only=True)
    # The judge's contract: it is binary and compares an answer with one reference, so it pays at
    # most one answer class per problem (`breaks_contract`). False for partial credit, LLM judges
    # and plugins that do not declare it (`gradsel_one_answer = True` on the function).
    one_answer: bool = field(default=False, kw_only=True)

    def __call__(self, problem: Problem, response: str, sample: int, seed: int) -> float:
        return self.score(problem, response, sample, seed)


REGISTRY: dict[str, Reward] = {
    r.name: r
    for r in (
        Reward("int", int_reward, _last_int, answer_form="the last integer in the response", one_answer=True),
        Reward(
            "exact",
            exact_reward,
            lambda text: text.strip(),
            one_answer=True,
            answer_form="the whole response, equal to the reference once stripped of surrounding whitespace",
        ),
        # The coin flip stands in for a binary reference judge that ignores the answer (the noisy
        # regime: rows that claim such a judge but are coin-flipped). It declares the contract of the
        # judge it stands in for, which it then breaks, as the broken judge would.
        Reward(
            "random",
            random_reward,
            final_answer,
            answer_form="nothing: a seeded coin flip, whatever the response",
            one_answer=True,
        ),
        Reward(
            "math",
            math_reward,
            last_boxed,
            math_equal,
            math_key,
            checks_ground_truth=True,
            one_answer=True,
            answer_form="\\boxed{...}: the last \\boxed{} answer, equal to the reference under math-verify",
        ),
        Reward(
            "gsm8k",
            gsm8k_reward,
            gsm8k_answer,
            one_answer=True,
            answer_form=f"#### N: the number after the last '#### ' in the response's last {_TAIL_CHARS} characters",
        ),
        Reward(
            "math_dapo",
            dapo_reward,
            dapo_answer,
            math_equal,
            math_key,
            checks_ground_truth=True,
            one_answer=True,
            answer_form=f"Answer: ...: the text after the last 'Answer:' in the response's last {_TAIL_CHARS} "
            "characters, equal to the reference under math-verify (pays 1, else -1)",
        ),
    )
}

# verl's generic styles: the reward is then chosen by data_source, as verl's default_compute_score does.
RULE_STYLES = ("", "rule")

# data_source -> reward, mirroring verl's default_compute_score (verl/utils/reward_score/__init__.py).
# verl checks MATH answers with its string normaliser and numina answers with prime_math's
# sympy grader; gradsel uses math-verify for both (`--reward verl` runs verl's own code).
ROUTES: dict[str, str] = {
    "openai/gsm8k": "gsm8k",
    "lighteval/MATH": "math",
    "DigitalLearningGmbH/MATH-lighteval": "math",
    "HuggingFaceH4/MATH-500": "math",
    "math_dapo": "math_dapo",
    **{
        f"numina_{name}": "math"
        for name in ("aops_forum", "synthetic_math", "amc_aime", "synthetic_amc", "cn_k12", "olympiads")
    },
}
# data_source prefixes: verl's `aime*`, and gradsel's own bundled arithmetic (`gradsel demo-data`).
ROUTE_PREFIXES: tuple[tuple[str, str], ...] = (("aime", "math_dapo"), ("arith/", "int"))


def route(data_source: str) -> str | None:
    """The reward name verl's table gives a data source, or None when no route knows it."""
    if data_source in ROUTES:
        return ROUTES[data_source]
    return next((name for prefix, name in ROUTE_PREFIXES if data_source.startswith(prefix)), None)


def _unknown_source(data_source: str, rows: int) -> GradselError:
    known = ", ".join([*ROUTES, *(f"{p}*" for p, _ in ROUTE_PREFIXES)])
    return GradselError(
        f"no reward for data_source {data_source!r} ({rows} row{'s' if rows != 1 else ''}, reward_model.style "
        "'rule'); gradsel will not guess one",
        f"pass --reward NAME ({', '.join(REGISTRY)}, verl) or --reward module:function; "
        f"data sources routed by default: {known}",
    )


def _plugin(spec: str) -> Reward:
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise GradselError(
            f"cannot import reward plugin {spec!r}: {exc}",
            "use module:function with the module importable from the current directory",
        ) from exc
    return _verl_style(spec, func)


def _verl_style(name: str, func) -> Reward:
    """A reward from a function with verl's signature. gradsel cannot see how it reads answers, so
    judge consistency uses the extraction of the row's route, or a generic one (`answer_judge`)."""

    def call(problem: Problem, response: str, sample: int, seed: int) -> float:
        try:
            out = func(problem.data_source, response, problem.ground_truth, problem.extra_info)
        except Exception as exc:  # a user's plugin can raise anything; report it, do not crash
            raise GradselError(
                f"reward {name} raised {type(exc).__name__}: {exc} "
                f"(problem {problem.problem_id}, data_source {problem.data_source!r})",
                "fix the reward function; nothing was written for this shard",
            ) from exc
        if isinstance(out, dict):
            out = out.get("score")
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            raise GradselError(
                f"reward {name} returned {type(out).__name__}, not a number (problem {problem.problem_id})",
                "return a float, or a dict with a 'score' float",
            )
        if not math.isfinite(out):
            raise GradselError(
                f"reward {name} returned {out} (problem {problem.problem_id})", "rewards must be finite numbers"
            )
        return float(out)

    form = (
        "what verl's default_compute_score reads for the row's data_source"
        if name == "verl"
        else f"whatever the plugin {name} reads"
    )
    # verl's routes promise the contract per row (`promises_one_answer`); a plugin declares it itself.
    return Reward(
        name,
        call,
        final_answer,
        extracts=False,
        answer_form=form,
        one_answer=name != "verl" and getattr(func, "gradsel_one_answer", False) is True,
    )


def _verl_default() -> Reward:
    try:
        from verl.utils.reward_score import default_compute_score
    except ImportError as exc:
        raise GradselError(
            "--reward verl needs verl's reward functions, and verl is not importable",
            "pip install verl in this environment, or drop --reward to use gradsel's mirror of verl's table",
        ) from exc
    return _verl_style("verl", default_compute_score)


def resolve_reward(problem: Problem, override: str | None = None) -> Reward:
    """Pick the reward for one problem: --reward, else its style, else its data_source's route."""
    if override:
        return _override(override)
    if problem.reward_style in REGISTRY:
        return REGISTRY[problem.reward_style]
    if problem.reward_style not in RULE_STYLES:
        raise GradselError(
            f"unknown reward style {problem.reward_style!r} (problem {problem.problem_id})",
            f"styles gradsel knows: {', '.join([*REGISTRY, *RULE_STYLES[1:]])}; "
            "or pass --reward NAME or --reward module:function",
        )
    name = route(problem.data_source)
    if name is None:
        raise _unknown_source(problem.data_source, 1)
    return REGISTRY[name]


@functools.lru_cache(maxsize=None)
def _override(spec: str) -> Reward:
    if ":" in spec:
        return _plugin(spec)
    if spec == "verl":
        return _verl_default()
    if spec not in REGISTRY:
        raise GradselError(
            f"unknown reward {spec!r}", f"choose one of {', '.join([*REGISTRY, 'verl'])} or give module:function"
        )
    return REGISTRY[spec]


RewardsBySource = dict[str, dict[str, int]]  # data_source -> {reward name: rows it judges}


def reward_findings(
    problems: Sequence[Problem], override: str | None = None
) -> tuple[RewardsBySource, list[GradselError]]:
    """Resolve every problem's reward before any rollout: (every reward of each data source with
    the rows it judges, most rows first; problems found).

    A source's rows can be judged by several rewards (a `reward_model.style` per row), so every
    (source, reward) pair is counted. The problems name a data source that no route knows, with
    its row count, and reference answers that a math judge cannot parse: either would pay every
    response 0. A bad --reward or an unknown style raises at once.
    """
    by_source: RewardsBySource = {}
    unknown: dict[str, int] = {}
    unparsable: list[Problem] = []
    for p in problems:
        if not override and p.reward_style in RULE_STYLES and route(p.data_source) is None:
            unknown[p.data_source] = unknown.get(p.data_source, 0) + 1
            continue
        reward = resolve_reward(p, override)
        counts = by_source.setdefault(p.data_source, {})
        counts[reward.name] = counts.get(reward.name, 0) + 1
        if reward.checks_ground_truth and not parse_math(p.ground_truth):
            unparsable.append(p)
    by_source = {
        source: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        for source, counts in by_source.items()
    }
    findings = [_unknown_source(source, rows) for source, rows in unknown.items()]
    if unparsable:
        shown = ", ".join(f"{p.problem_id} ({p.ground_truth[:40]!r})" for p in unparsable[:5])
        more = f" and {len(unparsable) - 5} more" if len(unparsable) > 5 else ""
        findings.append(
            GradselError(
                f"math-verify cannot parse the reference answer of {len(unparsable)} problem(s): {shown}{more}",
                "fix reward_model.ground_truth (LaTeX without \\boxed, or a number), or pass --reward with a "
                "judge that reads them",
            )
        )
    return by_source, findings


def check_rewards(problems: Sequence[Problem], override: str | None = None) -> RewardsBySource:
    """`reward_findings`, raising the first problem: {data_source: {reward name: rows}}."""
    by_source, findings = reward_findings(problems, override)
    if findings:
        raise findings[0]
    return by_source


# -- judge consistency ----------------------------------------------------------------------------


def answer_judge(reward: Reward, problem: Problem) -> Reward:
    """Whose extraction reads a response's answer: the reward's own, or for a plugin the one of
    the row's route (a verl plugin on openai/gsm8k reads `#### N`), else a generic one."""
    if reward.extracts:
        return reward
    return REGISTRY.get(route(problem.data_source) or "", reward)


def answer_classes(reward: Reward, problem: Problem, responses: Sequence[str]) -> list[int | None]:
    """Group one problem's responses by the answer they commit to, as the judge compares answers:
    a class number per response (first-seen order), None where a response commits to none."""
    judge = answer_judge(reward, problem)
    answers = [judge.answer(text) for text in responses]
    class_of: dict[str, int] = {}  # answer string -> class
    class_of_key: dict[str, int] = {}  # canonical key -> class
    representatives: list[tuple[str, int]] = []  # one keyless answer per class, for `same`
    n_classes = 0
    for a in answers:
        if a is None or a in class_of:
            continue
        key = judge.key(a) if judge.key is not None else None
        if key is not None:
            match = class_of_key.get(key)
        elif judge.same is not None:  # distinct strings can still be one answer
            match = next((c for d, c in representatives if judge.same(d, a)), None)
        else:
            match = None
        if match is None:
            match, n_classes = n_classes, n_classes + 1
            if key is None:
                representatives.append((a, match))
        if key is not None:
            class_of_key[key] = match
        class_of[a] = match
    return [None if a is None else class_of[a] for a in answers]


def judge_consistency(classes: Sequence[int | None], rewards: Sequence[float]) -> float:
    """1 - (pairs with the same answer but different rewards) / (pairs with the same answer);
    1.0 when no two responses share an answer. Responses without an answer are not compared."""
    by_class: dict[int, list[float]] = {}
    for c, r in zip(classes, rewards):
        if c is not None:
            by_class.setdefault(c, []).append(r)
    same = conflict = 0
    for rs in by_class.values():
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                same += 1
                conflict += rs[i] != rs[j]
    return 1.0 - conflict / same if same else 1.0


# -- the judge's contract -------------------------------------------------------------------------


def promises_one_answer(reward: Reward, problem: Problem) -> bool:
    """Whether the judge of this row promises the contract: binary, one reference, so at most one
    paid answer class. Declared on the Reward record; `--reward verl` promises it on the rows its
    table routes (verl's gsm8k, MATH and math_dapo rules), not on other sources."""
    if reward.name == "verl":
        return route(problem.data_source) is not None
    return reward.one_answer


def paid_answers(classes: Sequence[int | None], rewards: Sequence[float]) -> int:
    """How many distinct answer classes were paid (reward above 0: math_dapo's unpaid get -1)."""
    return len({c for c, r in zip(classes, rewards) if c is not None and r > 0})


def breaks_contract(promised: bool, classes: Sequence[int | None], rewards: Sequence[float]) -> bool:
    """A judge that compares one answer with one reference pays at most one answer class; two
    distinct paid answers to one problem mean it did not read the answer (a coin flip, a judge
    that ignores the response). Judges that promise nothing never break it."""
    return promised and paid_answers(classes, rewards) > 1
