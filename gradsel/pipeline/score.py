"""The `score` path end to end: snapshot, rollouts of pool and validation set, gradients, scores.

Each stage is resumable and skipped when it is already complete for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradsel.gradients.stage import ScoreConfig, score_stage
from gradsel.inputs.problems import read_problems
from gradsel.inputs.snapshot import loadable_path, snapshot_into_store
from gradsel.rewards.registry import check_rewards, promises_one_answer, resolve_reward
from gradsel.rollout.stage import LazyEngine, SamplingConfig, VLLMOptions, rollout_stage, run_rollout_stage
from gradsel.store.directory import open_store


@dataclass(frozen=True)
class RolloutOptions:
    n: int = 8
    n_val: int | None = None  # rollouts per validation problem; default n
    engine: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    reward: str | None = None
    prompt_key: str | None = None
    answer_key: str | None = None
    hash_mode: str = "sha256"
    copy: bool = False
    shard_size: int = 256  # problems per resumable rollout shard
    # vLLM's parallelism and memory (rollout.VLLMOptions)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    @property
    def vllm(self) -> VLLMOptions:
        return VLLMOptions(self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len)


@dataclass(frozen=True)
class ScoreResult:
    store: Path
    scores: object  # pyarrow Table, schema.SCORES; None for a `--shard` part
    spec: object  # gradients.ProjectorSpec


def run_score(
    store_dir: Path, *, model: str, pool: Path, val: Path, ro: RolloutOptions, sc: ScoreConfig, part=None
) -> ScoreResult:
    """Score `pool` against `val` into the store. `part` (store.Part, `--shard i/N`): make only that
    part's train shards of rollouts and features (the validation set's too where the alignment
    needs them, shared through their locks), and leave the scores, None in the result, to a run
    without one."""
    sc.validate()
    pool_set = read_problems(pool, prompt_key=ro.prompt_key, answer_key=ro.answer_key)
    val_set = read_problems(val, prompt_key=ro.prompt_key, answer_key=ro.answer_key)
    for problem_set in (pool_set, val_set):  # refuse a bad reward before anything is written
        check_rewards(problem_set.problems, ro.reward)
    store = open_store(store_dir)
    snap = snapshot_into_store(store, model, mode=ro.hash_mode, copy=ro.copy)
    if "vocabulary" not in store.read_manifest():  # what `refresh` compares a new checkpoint with
        from gradsel.inputs.models import vocabulary_digest

        store.update_manifest(vocabulary=vocabulary_digest(snap.path))
    model_path = loadable_path(store, snap)  # a LoRA adapter: merged onto its base, once
    engine = LazyEngine(ro.engine, model_path, vllm=ro.vllm)  # one engine for both splits, started only if needed
    stages = {}
    # The small validation set first: its prompts are checked (and rolled out) before the pool's.
    # A part rolls it out only where its alignment needs it in the pass.
    val_now = part is None or (sc.feature == "projected" and sc.alignment != "sketch")
    for split, problem_set, n in (("val", val_set, ro.n_val or ro.n), ("train", pool_set, ro.n)):
        cfg = SamplingConfig(n=n, temperature=ro.temperature, top_p=ro.top_p, max_tokens=ro.max_tokens, seed=ro.seed)
        if split == "val" and not val_now:
            stages[split] = rollout_stage(
                store,
                split,
                problem_set,
                model_hash=snap.content_hash,
                cfg=cfg,
                engine_name=engine.name,
                reward=ro.reward,
                shard_size=ro.shard_size,
            )
            continue
        stages[split] = run_rollout_stage(
            store,
            split,
            problem_set,
            model_path=model_path,
            model_hash=snap.content_hash,
            cfg=cfg,
            engine=engine,
            reward=ro.reward,
            shard_size=ro.shard_size,
            part=part if split == "train" else None,
            vllm=ro.vllm,
        )
    # Per split: verl numbers extra_info.index from 0 in train and test files alike.
    sources = {
        split: {p.problem_id: p.data_source for p in problem_set.problems}
        for split, problem_set in (("train", pool_set), ("val", val_set))
    }
    contracts = {
        split: {p.problem_id: promises_one_answer(resolve_reward(p, ro.reward), p) for p in problem_set.problems}
        for split, problem_set in (("train", pool_set), ("val", val_set))
    }
    scores, spec = score_stage(
        store,
        model_path=model_path,
        model_hash=snap.content_hash,
        train=stages["train"],
        val=stages["val"],
        data_sources=sources,
        cfg=sc,
        part=part,
        contracts=contracts,
    )
    return ScoreResult(store_dir, scores, spec)
