"""Data sources whose judge never pays (or always pays), found after the rollouts.

A model that never writes the answer form its judge reads (verl's GSM8K rule pays only `#### N`,
MATH only a `\\boxed{}` answer) gets reward 0 on every rollout of that source: every one of its
problems then has zero GRPO advantage and silently leaves the candidates. So do the problems of a
source paid on every rollout. After the rollouts of each split, every (data source, reward) pair
with at least MIN_PROBLEMS problems that no rollout was paid on, or every rollout was, gets a
warning that names the source, the reward, the answer form that reward reads and two of its
responses; the rollout stage records it in the manifest, and `gradsel check --sample` prints
the same warning from a few rollouts per source, before any long run.

The same tally checks the judge's contract (rewards.breaks_contract): a binary judge that
compares an answer with one reference pays at most one answer class per problem. Per pair, the
share of its mixed problems (some rollouts paid, some not) that were paid two distinct answers is
recorded; a pair whose judge promises the contract and breaks it on more than half of them
(CONTRACT_SHARE, with at least MIN_MIXED mixed problems) gets a loud warning: its reward function
does not read the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gradsel.inputs.problems import Problem
from gradsel.rewards.registry import breaks_contract, promises_one_answer, resolve_reward

MIN_PROBLEMS = 8  # fewer problems than this are not evidence enough for a warning
# A working one-answer judge never pays two answers, so any broken problem is a defect; more than
# half of a source's mixed problems broken says the defect is the source's whole reward function.
CONTRACT_SHARE = 0.5
MIN_MIXED = 4
SAMPLE_CHARS = 120  # how much of each sample response a warning quotes
SAMPLES = 2


@dataclass
class SourcePay:
    """How often one (data source, reward) pair paid its rollouts: a rollout is paid when its reward
    is above 0 (math_dapo's unpaid rollouts get -1)."""

    data_source: str
    reward: str
    answer_form: str
    problems: int = 0
    rollouts: int = 0
    paid: int = 0
    samples: list[str] = field(default_factory=list)  # the first response of its first problems
    one_answer: bool = False  # its judge promises at most one paid answer class (rewards.promises_one_answer)
    mixed: int = 0  # problems with some rollouts paid and some not
    broken: int = 0  # of those, the ones paid two distinct answer classes (under a one-answer judge)
    broken_example: tuple[str, list[str]] | None = None  # (problem id, two paid responses of different answers)

    @property
    def pass_rate(self) -> float:
        return self.paid / self.rollouts if self.rollouts else 0.0

    @property
    def broken_share(self) -> float:
        return self.broken / self.mixed if self.mixed else 0.0

    def breaks_wholesale(self, min_mixed: int = MIN_MIXED) -> bool:
        """Whether to warn: the judge promises one paid answer and broke that on most mixed problems."""
        return self.one_answer and self.mixed >= min_mixed and self.broken_share > CONTRACT_SHARE

    def contract_warning(self, where: str) -> str:
        example = ""
        if self.broken_example:
            pid, texts = self.broken_example
            example = (
                f" Problem {pid} was paid both "
                + " and ".join(json.dumps(t[:SAMPLE_CHARS], ensure_ascii=False) for t in texts)
                + "."
            )
        return (
            f"{where}: reward {self.reward} paid two or more different answers to {self.broken} of {self.mixed} "
            f"mixed problems ({self.broken_share:.0%}) of data source {self.data_source or '(empty)'!r}. A judge "
            f"that compares an answer with one reference pays at most one, so this reward function ignores the "
            f"answer (a coin flip, or a bug): its problems rank last in the default selection.{example}"
        )

    def contract_record(self) -> dict:
        """The pair's contract tally, as the manifest keeps it (`gradsel info`, the report)."""
        return {
            "data_source": self.data_source,
            "reward": self.reward,
            "one_answer": self.one_answer,
            "mixed": self.mixed,
            "broken": self.broken,
        }

    def uniform(self, min_problems: int = MIN_PROBLEMS) -> bool:
        """Whether to warn: enough problems, and none or all of their rollouts paid."""
        return self.problems >= min_problems and self.rollouts > 0 and self.paid in (0, self.rollouts)

    def warning(self, where: str) -> str:
        """The warning's one line, `where` naming the rollouts (e.g. `rollouts/train`)."""
        how = "no rollout" if self.paid == 0 else "every rollout"
        quoted = ", ".join(json.dumps(s[:SAMPLE_CHARS], ensure_ascii=False) for s in self.samples)
        return (
            f"{where}: {how} of data source {self.data_source or '(empty)'!r} was paid by reward {self.reward} "
            f"({self.paid} of {self.rollouts} rollouts, {self.problems} problems), so every one of its problems "
            f"has zero advantage and leaves the candidates. {self.reward} reads {self.answer_form}. "
            f"Sample responses: {quoted}"
        )

    def record(self, where: str) -> dict:
        """The never-paid warning as the manifest keeps it."""
        return {
            "data_source": self.data_source,
            "reward": self.reward,
            "problems": self.problems,
            "rollouts": self.rollouts,
            "paid": self.paid,
            "answer_form": self.answer_form,
            "samples": [s[:SAMPLE_CHARS] for s in self.samples],
            "message": self.warning(where),
        }


def tally_pay(
    problems: Sequence[Problem], reward: str | None, rollouts: Iterable[tuple[str, int, float, str, int | None]]
) -> list[SourcePay]:
    """Per (data source, reward) pair of `problems` (first-seen order): problems, rollouts and paid
    rollouts among `rollouts`, given as (problem_id, sample, reward, response_text, answer_class),
    and the judge's contract (mixed problems, and those paid two answer classes); the samples
    are the first response (sample 0) of each of its first problems, up to SAMPLES."""
    pair_of: dict[str, tuple[str, str]] = {}
    pays: dict[tuple[str, str], SourcePay] = {}
    for p in problems:
        judge = resolve_reward(p, reward)
        pair = (p.data_source, judge.name)
        pair_of[p.problem_id] = pair
        if pair not in pays:
            pays[pair] = SourcePay(
                p.data_source, judge.name, judge.answer_form, one_answer=promises_one_answer(judge, p)
            )
    # Per problem: (rewards, answer classes, paid texts by class); closed when its rollouts end
    # (a stage lists each problem's rollouts together).
    current: tuple[str, list[float], list, dict[int, str]] | None = None

    def close(problem_id: str, values: list[float], classes: list, paid_texts: dict[int, str]) -> None:
        pay = pays[pair_of[problem_id]]
        if any(v > 0 for v in values) and not all(v > 0 for v in values):
            pay.mixed += 1
            if breaks_contract(pay.one_answer, classes, values):
                pay.broken += 1
                if pay.broken_example is None:
                    pay.broken_example = (problem_id, list(paid_texts.values())[:2])

    for problem_id, sample, value, text, answer in rollouts:
        pay = pays[pair_of[problem_id]]
        if current is None or current[0] != problem_id:
            if current is not None:
                close(*current)
            current = (problem_id, [], [], {})
            pay.problems += 1
        current[1].append(value)
        current[2].append(answer)
        if value > 0 and answer is not None:
            current[3].setdefault(answer, text)
        pay.rollouts += 1
        pay.paid += value > 0
        if sample == 0 and len(pay.samples) < SAMPLES:
            pay.samples.append(text)
    if current is not None:
        close(*current)
    return [pay for pay in pays.values() if pay.rollouts]


def stage_pay(shards, problems: Sequence[Problem], reward: str | None) -> list[SourcePay]:
    """`tally_pay` over a rollout stage's shards (rollout.RolloutShards), one shard in memory at a time."""

    def rows():
        for i in range(shards.n_shards):
            cols = shards.shard(i, ["problem_id", "sample", "reward", "response_text", "answer_class"]).to_pydict()
            yield from zip(
                cols["problem_id"], cols["sample"], cols["reward"], cols["response_text"], cols["answer_class"]
            )

    return tally_pay(problems, reward, rows())


def uniform_pay(pays: Iterable[SourcePay], min_problems: int = MIN_PROBLEMS) -> list[SourcePay]:
    return [pay for pay in pays if pay.uniform(min_problems)]


def contract_breakers(pays: Iterable[SourcePay], min_mixed: int = MIN_MIXED) -> list[SourcePay]:
    return [pay for pay in pays if pay.breaks_wholesale(min_mixed)]
