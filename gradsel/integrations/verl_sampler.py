"""verl's V1 custom sampler: a replay buffer that evicts the groups of problems gradsel flags.

Imported by verl, inside the V1 trainer's process, never by gradsel (it imports verl and
TransferQueue at import time). Launch verl's V1 trainer with

    trainer.v1.sampler.custom_sampler.path=pkg://gradsel.integrations.verl_sampler
    trainer.v1.sampler.custom_sampler.name=GradselReplayBuffer        # GradselReplayBufferAsync for async modes
    +trainer.v1.sampler.sampler_kwargs.ranking=/abs/ranking.parquet

and (re)write the ranking file with `python -m gradsel.integrations.verl --store S --out RANKING
[--audit SUSPECTS]` whenever a `gradsel refresh` or `gradsel audit` has news (docs/trainers.md).

What verl 0.9.1 does (verl/trainer/ppo/v1/replay_buffer.py, trainer_base.py, agent_loop_tq.py):
- `PPOTrainer._build_replay_buffer` loads the class with `load_extern_type(path, name)` and builds
  it with trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy,
  sampler_kwargs and refill_fn (the trainer's `_add_prompts_to_generate`); a custom class gets no
  DAPO filter, batch sizes or `sync_refill_failed_groups`.
- Trajectories live in TransferQueue: a prompt group under key `{uid}` (tag is_prompt, status
  pending/running/finished/failure) and each rollout under `{uid}_{session}_{i}`, whose fields hold
  the dataset row's columns (data_source, extra_info, raw_prompt, reward_model, ...).
- Every poll of `sample` asks `_terminal_eviction_reasons` for (stale, DAPO-filtered, failed)
  groups, clears their union from TransferQueue (`_evict_terminal_groups`) and refills: the async
  buffer exactly as many prompts, the sync one as many when too few groups are left. `refill_fn`
  submits whole `data.gen_batch_size` fetches, so run the sync trainer with
  trainer.v1.sampler.sync_refill_failed_groups=True (verl then fetches one prompt at a time; the
  flag itself is not passed to a custom sampler) or data.gen_batch_size=1.

So the subclass adds gradsel's flagged groups to the failed set (verl then clears and refills them
as it does failed groups), and relabels them in the metrics as `training/gradsel/evicted_samples`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

logger = logging.getLogger(__name__)

REASONS = ("zero_advantage", "unreliable_judge", "suspect_key")
# Fields of a rollout that name its problem as `gradsel score` named it (problems.problem_from_row).
ID_FIELDS = ["data_source", "extra_info", "raw_prompt", "reward_model"]


def flagged_problems(ranking: Path, evict: tuple[str, ...], min_judge_reliability: float) -> dict[str, list[str]]:
    """problem id -> the reasons (of `evict`) the ranking file flags it for."""
    import pyarrow.parquet as pq

    table = pq.read_table(ranking, columns=["problem_id", "zero_advantage", "judge_reliability", "suspect_key"])
    flagged: dict[str, list[str]] = {}
    for row in table.to_pylist():
        reasons = [
            name
            for name, hit in (
                ("zero_advantage", row["zero_advantage"]),
                ("unreliable_judge", row["judge_reliability"] < min_judge_reliability),
                ("suspect_key", row["suspect_key"]),
            )
            if hit and name in evict
        ]
        if reasons:
            flagged[row["problem_id"]] = reasons
    return flagged


def problem_id_of(fields: dict) -> str:
    """gradsel's id of the problem a rollout answered, from the dataset columns verl stored with it."""
    from gradsel.inputs.problems import problem_from_row

    row = {
        "prompt": fields.get("raw_prompt"),
        "reward_model": fields.get("reward_model"),
        "extra_info": fields.get("extra_info"),
        "data_source": fields.get("data_source"),
    }
    return problem_from_row(row, 0).problem_id


class GradselEviction:
    """The part shared by the sync and async buffers. sampler_kwargs:
    ranking                the ranking file (required); re-read whenever it is replaced or its mtime or size changes
    evict                  which flags evict (default all: zero_advantage, unreliable_judge, suspect_key)
    min_judge_reliability  below it a problem's judge is unreliable (default 0.5; 0 = broke the contract)
    """

    def __init__(self, *args, sampler_kwargs=None, **kwargs):
        super().__init__(*args, sampler_kwargs=sampler_kwargs, **kwargs)
        options = dict(sampler_kwargs or {})
        if not options.get("ranking"):
            raise ValueError(
                "GradselReplayBuffer needs trainer.v1.sampler.sampler_kwargs.ranking: the file "
                "`python -m gradsel.integrations.verl --store S --out FILE` writes"
            )
        self.ranking = Path(str(options["ranking"]))
        self.evict = tuple(options.get("evict") or REASONS)
        unknown = sorted(set(self.evict) - set(REASONS))
        if unknown:
            raise ValueError(f"sampler_kwargs.evict names {unknown}; choose among {list(REASONS)}")
        self.min_judge_reliability = float(options.get("min_judge_reliability", 0.5))
        self.flagged: dict[str, list[str]] = {}
        self.ranking_reads = 0  # how often the file was actually read (not just stat'ed)
        self._ranking_stamp: tuple[int, int, int] | None = None
        self._problem_of_uid: dict[str, dict[str, str]] = defaultdict(dict)  # partition -> uid -> problem id
        self._gradsel_evicting: dict[str, dict[str, list[str]]] = defaultdict(dict)  # partition -> uid -> reasons
        self.reload_ranking()
        if self._ranking_stamp is None:
            raise ValueError(f"sampler_kwargs.ranking {self.ranking} does not exist")

    def reload_ranking(self) -> bool:
        """Re-read the ranking file when it was replaced or its mtime or size changed; True when it was read. A file
        that went missing or cannot be read keeps the flags last read (logged)."""
        try:
            st = os.stat(self.ranking)
        except OSError as exc:
            if self._ranking_stamp is not None:
                logger.warning("gradsel ranking %s unreadable (%s): keeping the flags last read", self.ranking, exc)
            return False
        # A new inode catches an atomic replace within the file system's mtime resolution.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._ranking_stamp:
            return False
        try:
            self.flagged = flagged_problems(self.ranking, self.evict, self.min_judge_reliability)
        except Exception as exc:  # a file replaced by hand, not atomically: try again at its next change
            logger.warning("gradsel ranking %s unreadable (%s): keeping the flags last read", self.ranking, exc)
            return False
        self._ranking_stamp = stamp
        self.ranking_reads += 1
        logger.info("gradsel ranking %s: %d problems flagged", self.ranking, len(self.flagged))
        return True

    def _problem_ids(self, partition_id: str, uids: set[str]) -> dict[str, str]:
        """uid -> problem id for finished groups, read once per group from one of its rollouts
        (a finished group never changes)."""
        known = self._problem_of_uid[partition_id]
        for uid in known.keys() - uids:
            del known[uid]
        first_key: dict[str, str] = {}
        for key in self.partitions[partition_id]:
            uid = key.split("_")[0]
            if uid in uids and uid not in known:
                first_key.setdefault(uid, key)
        if first_key:
            data = tq.kv_batch_get(keys=list(first_key.values()), partition_id=partition_id, select_fields=ID_FIELDS)
            for i, uid in enumerate(first_key):
                try:
                    known[uid] = problem_id_of(
                        {name: _plain(data[name][i]) for name in ID_FIELDS if name in data.keys()}
                    )
                except ValueError as exc:  # a row gradsel cannot name was never scored, so never flagged
                    logger.warning("gradsel: group %s has no problem id (%s); it is kept", uid, exc)
                    known[uid] = ""
        return known

    def _terminal_eviction_reasons(self, global_steps: int, partition_id: str):
        stale, dapo, failed, dapo_counts = super()._terminal_eviction_reasons(global_steps, partition_id)
        if partition_id == "val":
            return stale, dapo, failed, dapo_counts
        self.reload_ranking()
        finished = set(self.finished_keys[partition_id])
        problem_of = self._problem_ids(partition_id, finished) if self.flagged else {}
        ours = {uid: self.flagged[pid] for uid, pid in problem_of.items() if pid in self.flagged}
        # Counted as gradsel's only where verl had no reason of its own.
        self._gradsel_evicting[partition_id] = {uid: r for uid, r in ours.items() if uid not in stale | dapo | failed}
        return stale, dapo, failed | set(ours), dapo_counts

    def _evict_terminal_groups(self, global_steps: int, partition_id: str, eviction_reasons):
        evicted, stale_count, dapo_count, metrics = super()._evict_terminal_groups(
            global_steps, partition_id, eviction_reasons
        )
        ours = self._gradsel_evicting.pop(partition_id, {})
        if ours:
            prefix = self._metrics_prefix(partition_id)
            failure_key = f"{prefix}/rollout_failure/evicted_samples"
            left = metrics.get(failure_key, 0) - len(ours)
            if left > 0:
                metrics[failure_key] = left
            else:
                metrics.pop(failure_key, None)
            metrics[f"{prefix}/gradsel/evicted_samples"] = len(ours)
            for reason, count in Counter(r for reasons in ours.values() for r in reasons).items():
                metrics[f"{prefix}/gradsel/evicted_{reason}"] = count
        return evicted, stale_count, dapo_count, metrics


def _plain(value):
    """A TransferQueue non-tensor value as the Python object it was put as."""
    value = getattr(value, "data", value)
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


class GradselReplayBuffer(GradselEviction, ReplayBuffer):
    """verl's sync V1 replay buffer (trainer.v1.trainer_mode=sync) with gradsel's evictions."""


class GradselReplayBufferAsync(GradselEviction, ReplayBufferAsync):
    """verl's async V1 replay buffer (the colocate/separate async modes) with gradsel's evictions."""
