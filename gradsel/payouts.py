"""Data sources whose judge never pays (or always pays), found after the rollouts.

A model that never writes the answer form its judge reads (verl's GSM8K rule pays only `#### N`,
MATH only a `\\boxed{}` answer) gets reward 0 on every rollout of that source: every one of its
problems then has zero GRPO advantage and silently leaves the candidates. So do the problems of a
source paid on every rollout. After the rollouts of each split, every (data source, reward) pair
with at least MIN_PROBLEMS problems that no rollout was paid on, or every rollout was, gets a
warning that names the source, the reward, the answer form that reward reads and two of its
responses; the rollout stage records it in the manifest, and `gradsel check --sample` prints
the same warning from a few rollouts per source, before any long run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gradsel.problems import Problem
from gradsel.rewards import resolve_reward

MIN_PROBLEMS = 8  # fewer problems than this are not evidence enough for a warning
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

    @property
    def pass_rate(self) -> float:
        return self.paid / self.rollouts if self.rollouts else 0.0

    def uniform(self, min_problems: int = MIN_PROBLEMS) -> bool:
        """Whether to warn: enough problems, and none or all of their rollouts paid."""
        return self.problems >= min_problems and self.rollouts > 0 and self.paid in (0, self.rollouts)

    def warning(self, where: str) -> str:
        """The warning's one line, `where` naming the rollouts (e.g. `rollouts/train`)."""
        how = "no rollout" if self.paid == 0 else "every rollout"
        quoted = ", ".join(json.dumps(s[:SAMPLE_CHARS], ensure_ascii=False) for s in self.samples)
        return (f"{where}: {how} of data source {self.data_source or '(empty)'!r} was paid by reward {self.reward} "
                f"({self.paid} of {self.rollouts} rollouts, {self.problems} problems), so every one of its problems "
                f"has zero advantage and leaves the candidates. {self.reward} reads {self.answer_form}. "
                f"Sample responses: {quoted}")

    def record(self, where: str) -> dict:
        """The warning as the manifest keeps it."""
        return {"data_source": self.data_source, "reward": self.reward, "problems": self.problems,
                "rollouts": self.rollouts, "paid": self.paid, "answer_form": self.answer_form,
                "samples": [s[:SAMPLE_CHARS] for s in self.samples], "message": self.warning(where)}


def tally_pay(problems: Sequence[Problem], reward: str | None,
              rollouts: Iterable[tuple[str, int, float, str]]) -> list[SourcePay]:
    """Per (data source, reward) pair of `problems` (first-seen order): problems, rollouts and paid
    rollouts among `rollouts`, given as (problem_id, sample, reward, response_text); the samples
    are the first response (sample 0) of each of its first problems, up to SAMPLES."""
    pair_of: dict[str, tuple[str, str]] = {}
    pays: dict[tuple[str, str], SourcePay] = {}
    for p in problems:
        judge = resolve_reward(p, reward)
        pair = (p.data_source, judge.name)
        pair_of[p.problem_id] = pair
        if pair not in pays:
            pays[pair] = SourcePay(p.data_source, judge.name, judge.answer_form)
    seen: set[str] = set()
    for problem_id, sample, value, text in rollouts:
        pay = pays[pair_of[problem_id]]
        if problem_id not in seen:
            seen.add(problem_id)
            pay.problems += 1
        pay.rollouts += 1
        pay.paid += value > 0
        if sample == 0 and len(pay.samples) < SAMPLES:
            pay.samples.append(text)
    return [pay for pay in pays.values() if pay.rollouts]


def stage_pay(shards, problems: Sequence[Problem], reward: str | None) -> list[SourcePay]:
    """`tally_pay` over a rollout stage's shards (rollout.RolloutShards), one shard in memory at a time."""

    def rows():
        for i in range(shards.n_shards):
            cols = shards.shard(i, ["problem_id", "sample", "reward", "response_text"]).to_pydict()
            yield from zip(cols["problem_id"], cols["sample"], cols["reward"], cols["response_text"])

    return tally_pay(problems, reward, rows())


def uniform_pay(pays: Iterable[SourcePay], min_problems: int = MIN_PROBLEMS) -> list[SourcePay]:
    return [pay for pay in pays if pay.uniform(min_problems)]
