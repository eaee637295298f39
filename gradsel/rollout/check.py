"""Pre-flight checks: what would go wrong with a problem file before any GPU time is spent.

`gradsel check` shows the report; `rollout` and `score` run the same checks before they start an
engine. Per data source: the rows, the reward that will judge them, the prompts' token lengths
under the model's chat template, and the prompts too long for the model.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradsel.core.errors import GradselError
from gradsel.inputs.problems import Problem, ProblemSet
from gradsel.rewards.registry import reward_findings
from gradsel.rollout.prompts import encode_prompts, too_long_error


@dataclass(frozen=True)
class SourceReport:
    data_source: str
    rows: int
    rewards: dict[str, int]  # every reward that judges some of its rows -> those rows; rows left out: no route
    prompt_tokens: tuple[int, int, int] | None  # (min, median, max), when a tokenizer was given
    too_long: int  # prompts over the limit


@dataclass
class CheckReport:
    split: str
    path: str
    sources: list[SourceReport]
    findings: list[GradselError] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "path": self.path,
            "sources": [s.__dict__ for s in self.sources],
            "problems": [{"error": f.message, "hint": f.hint} for f in self.findings],
        }


def check_problem_set(
    problem_set: ProblemSet, split: str, *, reward: str | None = None, tokenizer=None, limit: int | None = None
) -> CheckReport:
    """Per data source: rows, reward, prompt token lengths; and every problem found."""
    problems = problem_set.problems
    by_source, findings = reward_findings(problems, reward)
    lengths = [len(ids) for ids in encode_prompts(tokenizer, problems)] if tokenizer is not None else None
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(p.data_source, []).append(i)
    sources = []
    for source, rows in groups.items():
        stats, over = None, 0
        if lengths is not None:
            ns = [lengths[i] for i in rows]
            stats = (min(ns), int(statistics.median(ns)), max(ns))
            over = sum(n > limit for n in ns) if limit is not None else 0
        sources.append(SourceReport(source, len(rows), by_source.get(source, {}), stats, over))
    if lengths is not None and limit is not None:
        error = too_long_error(problems, lengths, limit)
        if error is not None:
            findings.append(error)
    return CheckReport(split, str(problem_set.path), sources, findings)


def describe_rewards(rewards: dict[str, int], rows: int) -> str:
    """A source's judges for the table: the reward's name where one judges every row, else each
    reward with its rows, and in red the rows that no route judges."""
    if len(rewards) == 1 and sum(rewards.values()) == rows:
        return next(iter(rewards))
    parts = [f"{name} {n}" for name, n in rewards.items()]
    if rows > sum(rewards.values()):
        parts.append(f"[red]none {rows - sum(rewards.values())}[/red]")
    return ", ".join(parts)


def show_reports(reports: Sequence[CheckReport], limit: int | None) -> None:
    """A table per file on stderr, then each problem as `problem:` + `hint:` lines."""
    from rich.table import Table

    from gradsel.core import console

    for report in reports:
        table = Table(title=f"{report.split}: {report.path}", title_justify="left")
        for column in (
            "data_source",
            "rows",
            "reward",
            "prompt tokens min / median / max",
            f"over {limit}" if limit else "over limit",
        ):
            table.add_column(column, justify="right" if column in ("rows",) else "left")
        for s in report.sources:
            tokens = " / ".join(map(str, s.prompt_tokens)) if s.prompt_tokens else "(pass --model)"
            table.add_row(
                s.data_source or "(empty)",
                str(s.rows),
                describe_rewards(s.rewards, s.rows),
                tokens,
                str(s.too_long) if s.prompt_tokens and limit else "-",
            )
        console.stderr.print(table)
    findings = [f for r in reports for f in r.findings]
    for f in findings:
        console.stderr.print(f"problem: {f.message}\nhint: {f.hint}", markup=False, highlight=False, soft_wrap=True)
    if not findings:
        console.stderr.print("no problems found", markup=False)


# -- check --sample: a few rollouts per data source -------------------------------------------------


def sample_problems(problems: Sequence[Problem], per_source: int) -> list[Problem]:
    """Up to `per_source` problems of each data source, a seeded choice (the same every run, and
    not just a file's first rows, which may be sorted by difficulty), in file order."""
    import random

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(p.data_source, []).append(i)
    chosen = [
        i
        for source, rows in groups.items()
        for i in random.Random(f"gradsel-check/{source}").sample(rows, min(per_source, len(rows)))
    ]
    return [problems[i] for i in sorted(chosen)]


def sample_pay(problems: Sequence[Problem], engine, cfg, reward: str | None = None):
    """Roll out `problems` k times (rollout.rollout_batches, rewards included) and tally each
    (data source, reward) pair's paid rollouts (payouts.SourcePay)."""
    from gradsel.rewards.payouts import tally_pay
    from gradsel.rollout.stage import rollout_batches

    rollouts = (r for batch in rollout_batches(problems, engine, cfg, reward=reward) for r in batch)
    return tally_pay(
        problems, reward, ((r.problem_id, r.sample, r.reward, r.response_text, r.answer_class) for r in rollouts)
    )


def sample_engine(name: str, model: str):
    """The engine `check --sample` rolls out with: a PEFT adapter goes through transformers, which
    merges it on load (vLLM would need the merged checkpoint that `score` writes into its store)."""
    from gradsel.inputs.models import adapter_base, resolve_model_path
    from gradsel.rollout.stage import make_engine, resolve_engine_name

    path = resolve_model_path(model)
    name = resolve_engine_name(name)
    if adapter_base(path) is not None:
        if name == "vllm":
            raise GradselError(
                "check --sample rolls a PEFT adapter out with transformers, not vLLM", "pass --engine hf (or auto)"
            )
        name = "hf"
    return make_engine(name, path)


def show_sample(split: str, pays, per_source: int) -> list[dict]:
    """Each (data source, reward) pair's pass rate and judge's contract on stderr, then the warning
    of every pair that no sampled rollout was paid on (or every one was), and of every pair whose
    one-answer judge paid two answers to most of its mixed problems (payouts.py, with the
    thresholds lowered to the sample's size); returns the pairs as JSON."""
    from rich.table import Table

    from gradsel.core import console
    from gradsel.rewards.payouts import MIN_MIXED, MIN_PROBLEMS, contract_breakers, uniform_pay

    where = f"check --sample {per_source} ({split})"
    table = Table(title=f"{split}: sampled rollouts", title_justify="left")
    for column in ("data_source", "reward", "problems", "rollouts", "paid", "pass rate", "two answers paid"):
        table.add_column(column, justify="left" if column in ("data_source", "reward") else "right")
    for pay in pays:
        contract = f"{pay.broken} of {pay.mixed} mixed" if pay.one_answer else "(no contract)"
        table.add_row(
            pay.data_source or "(empty)",
            pay.reward,
            str(pay.problems),
            str(pay.rollouts),
            str(pay.paid),
            f"{pay.pass_rate:.2f}",
            contract,
        )
    console.stderr.print(table)
    flagged = uniform_pay(pays, min(MIN_PROBLEMS, per_source))
    for pay in flagged:
        console.warn(pay.warning(where))
    breakers = contract_breakers(pays, min(MIN_MIXED, per_source))
    for pay in breakers:
        console.warn(pay.contract_warning(where))
    return [
        {
            "data_source": pay.data_source,
            "reward": pay.reward,
            "problems": pay.problems,
            "rollouts": pay.rollouts,
            "paid": pay.paid,
            "pass_rate": round(pay.pass_rate, 4),
            "warning": pay.warning(where) if pay in flagged else None,
            "one_answer": pay.one_answer,
            "mixed": pay.mixed,
            "broken": pay.broken,
            "contract_warning": pay.contract_warning(where) if pay in breakers else None,
        }
        for pay in pays
    ]
