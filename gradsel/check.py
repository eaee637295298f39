"""Pre-flight checks: what would go wrong with a problem file before any GPU time is spent.

`gradsel check` shows the report; `rollout` and `score` run the same checks before they start an
engine. Per data source: the rows, the reward that will judge them, the prompts' token lengths
under the model's chat template, and the prompts too long for the model.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradsel.errors import GradselError
from gradsel.problems import Problem, ProblemSet
from gradsel.rewards import reward_findings


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
        return {"split": self.split, "path": self.path,
                "sources": [s.__dict__ for s in self.sources],
                "problems": [{"error": f.message, "hint": f.hint} for f in self.findings]}


def prompt_limit(context: int | None, max_prompt_tokens: int | None) -> int | None:
    """The longest prompt accepted: --max-prompt-tokens, else the model's context less one token
    (a prompt that fills the context leaves no room for a response)."""
    if max_prompt_tokens is not None:
        return max_prompt_tokens
    return context - 1 if context else None


def too_long_error(problems: Sequence[Problem], lengths: Sequence[int], limit: int) -> GradselError | None:
    long = [(p.problem_id, n) for p, n in zip(problems, lengths) if n > limit]
    if not long:
        return None
    shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in long[:8])
    more = f" and {len(long) - 8} more" if len(long) > 8 else ""
    return GradselError(f"{len(long)} prompt(s) exceed {limit} tokens under the chat template: {shown}{more}",
                        "drop or shorten those rows, or give the model a longer context (--max-model-len, or another model) "
                        "(`gradsel check` lists every data source's prompt lengths)")


def check_problem_set(problem_set: ProblemSet, split: str, *, reward: str | None = None,
                      tokenizer=None, limit: int | None = None) -> CheckReport:
    """Per data source: rows, reward, prompt token lengths; and every problem found."""
    from gradsel.rollout import encode_prompts

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

    from gradsel import console

    for report in reports:
        table = Table(title=f"{report.split}: {report.path}", title_justify="left")
        for column in ("data_source", "rows", "reward", "prompt tokens min / median / max",
                       f"over {limit}" if limit else "over limit"):
            table.add_column(column, justify="right" if column in ("rows",) else "left")
        for s in report.sources:
            tokens = " / ".join(map(str, s.prompt_tokens)) if s.prompt_tokens else "(pass --model)"
            table.add_row(s.data_source or "(empty)", str(s.rows), describe_rewards(s.rewards, s.rows), tokens,
                          str(s.too_long) if s.prompt_tokens and limit else "-")
        console.stderr.print(table)
    findings = [f for r in reports for f in r.findings]
    for f in findings:
        console.stderr.print(f"problem: {f.message}\nhint: {f.hint}", markup=False, highlight=False, soft_wrap=True)
    if not findings:
        console.stderr.print("no problems found", markup=False)
