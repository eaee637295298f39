"""The scoring stage: per-problem gradient features, the validation gradient, and alignment scores.

Store layout under `features/<feature id>/` (a digest of the projector spec and the loss,
validation and alignment options):

    spec.json                     projector spec + loss config + validation aggregation
    train/shard-00000.parquet     unit-normalised feature vectors (schema.vectors_schema) + markers
    val/shard-00000.parquet       the same for every validation problem
    scores.parquet                schema.SCORES, one row per candidate and validation problem
    stage.json                    present once complete

Vectors are stored unit-normalised with the norm in `scores.grad_norm`: gradient entries are
far below float16's normal range, their directions are not. Scores are always computed from
the stored vectors, so a resumed run gives exactly the scores of an uninterrupted one.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from gradsel.core import console
from gradsel.core.choices import ADVANTAGES, ALIGNMENTS, DTYPES, LOSS_AGGS, VAL_AGGS
from gradsel.core.errors import GradselError
from gradsel.core.fsutil import atomic_write_json, atomic_write_table
from gradsel.gradients import (
    LOW_RANK_MAX_COST,
    LOW_RANK_RESIDUAL,
    LOW_RANK_TILE,
    Packing,
    ProjectorSpec,
    exact_parameters,
    exact_problem_gradient,
    group_advantages,
    groups_from_table,
    head_features,
    make_spec,
    packing_for,
    projected_features,
    shared_prompt_attention,
    shared_prompt_support,
    truncate_validation_gradient,
    validation_gradient,
    zero_validation_gradient,
)
from gradsel.rewards.registry import breaks_contract, judge_consistency, paid_answers
from gradsel.store.directory import cost_since, shard_path, stable_key
from gradsel.store.stage import Stage
from gradsel.store.vectors import VectorSet


@dataclass(frozen=True)
class ScoreConfig:
    feature: str = "projected"
    sketch: tuple[int, int] = (16, 16)  # (k_out, k_in) per module
    blocks: int = 1  # independent sketches per module
    modules: str | None = (
        None  # regex over module names; None = every Linear, router and expert stack in the decoder blocks
    )
    adv: str = "grpo"
    loss_agg: str = "seq-mean-token-mean"
    val_agg: str = "batch"
    dtype: str = "float32"
    device: str = "auto"
    max_tokens_per_batch: int | None = None  # None: 2048 on the CPU, 16384 on a GPU (measured, docs/benchmarks.md)
    seed: int = 0
    vector_dtype: str = "float16"
    # <g_p, g_V> for the projected feature. sketch (the default): from the projected vectors, all
    # the default selection reads; in the hooked pass, for `select --target mean` modes: exact,
    # against the full validation gradient, or lowrank, against its SVD truncation
    # (gradients.truncate_validation_gradient). Both of those hold a full validation gradient.
    alignment: str = "sketch"
    # A problem's responses share one copy of its prompt in the gradient pass where the model
    # takes it (gradients.shared_prompt_support); the vectors are the same either way, so it is
    # not part of the features' key.
    share_prompts: bool = True

    def validate(self) -> None:
        for value, allowed, flag in (
            (self.adv, ADVANTAGES, "--adv"),
            (self.loss_agg, LOSS_AGGS, "--loss-agg"),
            (self.val_agg, VAL_AGGS, "--val-agg"),
            (self.alignment, ALIGNMENTS, "--alignment"),
        ):
            if value not in allowed:
                raise GradselError(f"unknown {flag} {value!r}", f"choose one of {', '.join(allowed)}")
        if self.dtype not in DTYPES:
            raise GradselError(f"unknown --dtype {self.dtype!r}", f"choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise GradselError(f"unknown --device {self.device!r}", "use auto, cpu, cuda or cuda:N")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as exc:
                raise GradselError(
                    f"--modules {self.modules!r} is not a regular expression ({exc})",
                    "for example --modules 'mlp|self_attn'",
                ) from exc


def parse_sketch(text: str) -> tuple[int, int]:
    try:
        k_out, k_in = (int(v) for v in text.lower().split("x"))
        assert k_out > 0 and k_in > 0
    except (ValueError, AssertionError) as exc:
        raise GradselError(f"bad --sketch {text!r}", "write KOUTxKIN, for example 16x16") from exc
    return k_out, k_in


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GradselError("--device cuda asked for, but torch sees no CUDA device", "use --device cpu")
    return device


def _unit(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (vectors / safe[:, None]).astype(np.float32), norms


def validation_direction(unit_vectors: np.ndarray, norms: np.ndarray, val_agg: str) -> np.ndarray:
    """The unit validation direction: normalised sum of gradients (`batch`) or normalised mean
    of the per-problem unit gradients (`mean-normalized`)."""
    if val_agg == "batch":
        direction = (unit_vectors.astype(np.float64) * norms[:, None]).sum(axis=0)
    else:
        direction = unit_vectors[norms > 0].astype(np.float64).sum(axis=0)
    n = np.linalg.norm(direction)
    if n == 0:
        raise zero_validation_gradient()
    return direction / n


def score_stage(
    store,
    *,
    model_path: Path,
    model_hash: str,
    train,
    val,
    data_sources: dict[str, dict[str, str]],
    cfg: ScoreConfig,
    part=None,
    contracts: dict[str, dict[str, bool]] | None = None,
):
    """Compute (or resume) features and scores from two rollout stages (rollout.RolloutShards);
    return (scores table (schema.SCORES), projector spec). Feature shard i is made from rollout
    shard i, under its own lock. With `part` (store.Part) only that part's train shards are made,
    and the scores are left to a run without one: it returns (None, spec). `contracts`: per split,
    problem id -> whether its judge promises at most one paid answer (rewards.promises_one_answer)."""
    import pyarrow as pa

    from gradsel.core.schema import SCORES
    from gradsel.inputs.models import load_causal_lm, load_tokenizer

    cfg, device = _settled_config(cfg, part)
    model = load_causal_lm(model_path, dtype=cfg.dtype, device=device)
    pad_id = load_tokenizer(model_path).pad_token_id
    spec = make_spec(
        model,
        feature=cfg.feature,
        modules=cfg.modules,
        sketch=cfg.sketch,
        seed=cfg.seed,
        dtype=cfg.dtype,
        blocks=cfg.blocks,
    )
    console.debug(
        f"projector: {cfg.feature}, {len(spec.modules)} modules, vector dim {spec.dim}, device {device}, "
        f"{cfg.max_tokens_per_batch} tokens per packed pass"
    )
    stage = _features_stage(store, spec, cfg, model_hash, train, val)
    if stage.complete:
        import pyarrow.parquet as pq

        console.info(f"{stage.name}: complete, reused")
        # A run killed after the stage, before its manifest entry, left the manifest behind.
        store.update_manifest(costs=stage.record().get("costs", {}), **_manifest_fields(spec, cfg, stage))
        return pq.read_table(stage.directory / "scores.parquet"), spec
    stage.claim("features")
    atomic_write_json(
        stage.directory / "spec.json",
        {
            "projector": spec.to_dict(),
            "loss": {"adv": cfg.adv, "loss_agg": cfg.loss_agg},
            "val_agg": cfg.val_agg,
            "alignment": cfg.alignment,
            "vector_dtype": cfg.vector_dtype,
        },
    )
    split = _FeatureSplit(model, spec, cfg, pad_id, device, _packing(store, model, cfg))
    if cfg.feature == "exact":
        aligned = _exact_alignment(split, train, val)
    elif cfg.alignment in ("exact", "lowrank"):
        aligned = _hooked_alignment(split, stage, train, val, part)
    else:
        aligned = _sketch_alignment(split, stage, train, val, part)
    if aligned is None:  # a part: the scores are the whole run's
        return None, spec
    contracts = contracts or {}
    rows = _score_rows(
        train,
        "train",
        aligned.norms_train,
        aligned.cos,
        aligned.dots,
        data_sources["train"],
        cfg.adv,
        contracts.get("train", {}),
    )
    rows += _score_rows(
        val,
        "val",
        aligned.norms_val,
        aligned.val_cos,
        aligned.val_dots,
        data_sources["val"],
        cfg.adv,
        contracts.get("val", {}),
    )
    table = pa.Table.from_pylist(rows, schema=SCORES)
    atomic_write_table(stage.directory / "scores.parquet", table)
    costs = aligned.costs  # stage name -> what it cost (store.stage_cost), recorded in the manifest
    if cfg.feature != "exact":
        costs |= {
            f"gradients/{name}": stage.sub(name).cost(shards.n_shards)
            for name, shards in (("train", train), ("val", val))
        }
    costs["scores"] = cost_since(aligned.start, bytes=(stage.directory / "scores.parquet").stat().st_size)
    stage.finish(
        {"train": train.n_problems, "val": val.n_problems, "costs": costs},
        manifest=_manifest_fields(spec, cfg, stage),
        costs=costs,
    )
    return table, spec


def _settled_config(cfg: ScoreConfig, part) -> tuple[ScoreConfig, str]:
    """The options checked and completed for this run: (config, device)."""
    cfg.validate()
    if cfg.feature != "projected":  # --alignment applies to the projected feature; record what the others do
        cfg = replace(cfg, alignment="exact" if cfg.feature == "exact" else "sketch")
    if part is not None and cfg.feature == "exact":
        raise GradselError("--shard does not apply to --feature exact", "score exact gradients in one process")
    device = resolve_device(cfg.device)
    if cfg.max_tokens_per_batch is None:
        # On the CPU, small packed batches are several times faster (cache-resident activations
        # and logits); a GPU wants large ones.
        cfg = replace(cfg, max_tokens_per_batch=2048 if device == "cpu" else 16384)
    return cfg, device


def _features_stage(store, spec: ProjectorSpec, cfg: ScoreConfig, model_hash: str, train, val) -> Stage:
    """`features/<feature id>`, keyed on the model, the projector, the options that change the
    numbers and the rollout stages' keys (each feature shard also records its rollout shard's
    checksum)."""
    method = {k: v for k, v in asdict(cfg).items() if k != "share_prompts"} | {
        "device": None,
        "shard_size": None,
        "max_tokens_per_batch": None,
    }  # numbers unchanged
    if cfg.alignment == "lowrank":  # the truncation rule sets the scores too
        method["low_rank"] = {
            "residual": LOW_RANK_RESIDUAL,
            "max_cost": LOW_RANK_MAX_COST,
            "tile": LOW_RANK_TILE,
            "ranks": "global",
        }
    key = stable_key({"model": model_hash, "spec": spec.to_dict(), "cfg": method, "train": train.key, "val": val.key})
    feature_id = stable_key({"spec": spec.to_dict(), "cfg": method})[:16]
    return Stage.at(store, "features", feature_id, key=key)


@dataclass
class _Alignment:
    """Each candidate's and validation problem's gradient norm, cosine and dot with the validation
    direction; what computing them cost so far, and when the scores' own cost began."""

    norms_train: np.ndarray
    cos: np.ndarray
    dots: np.ndarray
    norms_val: np.ndarray
    val_cos: np.ndarray
    val_dots: np.ndarray
    costs: dict
    start: float  # time.perf_counter() at the start of the scores' own work


def _exact_alignment(split: _FeatureSplit, train, val) -> _Alignment:
    """--feature exact: full gradients, no vectors stored; the validation problems score 0."""
    cfg = split.cfg
    train_groups, val_groups = groups_from_table(train.table(), cfg.adv), groups_from_table(val.table(), cfg.adv)
    start = time.perf_counter()
    dots, norms_train, norms_val = _exact_scores(
        split.model, train_groups, val_groups, split.spec, cfg, split.pad_id, split.device, split.packing
    )
    costs = {"gradients": cost_since(start)}
    start = time.perf_counter()  # the scores' own cost starts here, in every alignment
    return _Alignment(
        norms_train,
        _safe_div(dots, norms_train),
        dots,
        norms_val,
        np.zeros(len(val_groups)),
        np.zeros(len(val_groups)),
        costs,
        start,
    )


def _hooked_alignment(split: _FeatureSplit, stage: Stage, train, val, part) -> _Alignment | None:
    """--alignment exact or lowrank: vectors from the sketch (for the index); alignment against the
    full g_V or its truncation, in the same pass. Every part computes the (small) validation
    gradient itself; a part returns None once its train shards are made."""
    model, spec, cfg = split.model, split.spec, split.cfg
    val_groups = groups_from_table(val.table(), cfg.adv)
    split.make(stage.sub("val"), val, "val")
    norms_val, _ = _stored_norms(stage.directory / "val", val.n_shards)
    scales = None if cfg.val_agg == "batch" else [1 / n if n > 0 else 0.0 for n in norms_val]
    start = time.perf_counter()
    val_grad = validation_gradient(
        model,
        val_groups,
        spec.modules,
        loss_agg=cfg.loss_agg,
        pad_id=split.pad_id,
        device=split.device,
        max_tokens=cfg.max_tokens_per_batch,
        scales=scales,
        packing=split.packing,
    )
    if cfg.alignment == "lowrank":
        val_grad = truncate_validation_gradient(val_grad)
    costs = {"validation-gradient": cost_since(start)}
    split.make(stage.sub("train"), train, "train", val_grad=val_grad, part=part)
    if part is not None:
        return None
    start = time.perf_counter()
    norms_train, dots = _stored_norms(stage.directory / "train", train.n_shards)
    _, val_dots = projected_features(
        model,
        val_groups,
        spec,
        loss_agg=cfg.loss_agg,
        pad_id=split.pad_id,
        device=split.device,
        max_tokens=cfg.max_tokens_per_batch,
        val_grad=val_grad,
        packing=split.packing,
    )
    return _Alignment(
        norms_train,
        _safe_div(dots, norms_train),
        dots,
        norms_val,
        _safe_div(val_dots, norms_val),
        val_dots,
        costs,
        start,
    )


def _sketch_alignment(split: _FeatureSplit, stage: Stage, train, val, part) -> _Alignment | None:
    """--alignment sketch (the default): cosines with the validation direction, from the stored
    vectors alone; a part makes only its train shards and returns None."""
    if part is None:
        split.make(stage.sub("val"), val, "val")
    split.make(stage.sub("train"), train, "train", part=part)
    if part is not None:
        return None
    start = time.perf_counter()
    norms_val, _ = _stored_norms(stage.directory / "val", val.n_shards)
    unit_val = VectorSet(stage.directory, "val").load()
    direction = validation_direction(unit_val, norms_val, split.cfg.val_agg)
    # The candidates' vectors are streamed, a few hundred MB at a time, never held whole.
    cos = np.concatenate([v.astype(np.float64) @ direction for v in VectorSet(stage.directory, "train").batches()])
    norms_train, _ = _stored_norms(stage.directory / "train", train.n_shards)
    val_cos = unit_val.astype(np.float64) @ direction
    return _Alignment(norms_train, cos, cos * norms_train, norms_val, val_cos, val_cos * norms_val, {}, start)


def _manifest_fields(spec: ProjectorSpec, cfg: ScoreConfig, stage: Stage) -> dict:
    """What the manifest says of the store's current features (what `select` and `info` read)."""
    return {
        "projector": spec.to_dict(),
        "loss": {"adv": cfg.adv, "loss_agg": cfg.loss_agg},
        "val_agg": cfg.val_agg,
        "alignment": cfg.alignment,
        "features": stage.name,
    }


def _packing(store, model, cfg: ScoreConfig) -> Packing:
    """The gradient pass's layout: prompts shared where asked for and the model takes it. A
    fallback is said on stderr (packing_for) and, like the choice itself, recorded in the
    manifest's `prompt_sharing`, with the attention that runs the shared rows ("blocks" or
    "mask", gradients.attention)."""
    packing = packing_for(model, Packing(share_prompts=cfg.share_prompts))  # first: it warns
    reason = shared_prompt_support(model) if cfg.share_prompts else "--no-share-prompts"
    attention = shared_prompt_attention(model) if packing.share_prompts else None
    store.update_manifest(prompt_sharing={"used": packing.share_prompts, "reason": reason, "attention": attention})
    return packing


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


class _FeatureSplit:
    """Makes a split's feature shards from its rollout shards, each under its own lock."""

    def __init__(
        self, model, spec: ProjectorSpec, cfg: ScoreConfig, pad_id: int, device: str, packing: Packing
    ) -> None:
        self.model, self.spec, self.cfg, self.pad_id, self.device = model, spec, cfg, pad_id, device
        self.packing = packing

    def make(self, shards: Stage, rollouts, label: str, val_grad=None, part=None) -> None:
        """Feature shard i from rollout shard i, into `shards` (the stage's train or val), for every
        shard (of `part`) not done yet; `val_grad`: also store each problem's exact dot with it
        (`target_dot`)."""
        spec, cfg = self.spec, self.cfg
        todo = shards.todo(rollouts.n_shards, part, source=rollouts.checksum)
        if not todo:
            return
        compute = projected_features if spec.feature == "projected" else head_features
        with console.progress() as bar:
            task = bar.add_task(
                f"gradients/{label} ({spec.feature}, {spec.k_out}x{spec.k_in})",
                total=sum(rollouts.problems_in(i) for i in todo),
                rate="",
            )
            start, tokens = time.perf_counter(), 0

            def tick(n_seqs: int, n_tokens: int) -> None:
                nonlocal tokens
                tokens += n_tokens
                bar.update(task, rate=f"{tokens / (time.perf_counter() - start):.0f} tokens/s")

            def make(i: int):
                groups = groups_from_table(rollouts.shard(i), cfg.adv)
                kwargs = {"val_grad": val_grad} if val_grad is not None else {}
                out = compute(
                    self.model,
                    groups,
                    spec,
                    loss_agg=cfg.loss_agg,
                    pad_id=self.pad_id,
                    device=self.device,
                    max_tokens=cfg.max_tokens_per_batch,
                    progress=tick,
                    packing=self.packing,
                    **kwargs,
                )
                return self._table(groups, *(out if val_grad is not None else (out, None)))

            for i, _ in shards.make(todo, make, source=rollouts.checksum, tokens=lambda: tokens):
                bar.advance(task, rollouts.problems_in(i))
                bar.shard_done(task)

    def _table(self, groups, feats: np.ndarray, dots: np.ndarray | None):
        from gradsel.core.schema import vectors_table

        unit, norms = _unit(feats)
        return vectors_table([g.problem_id for g in groups], unit, norms, dots, self.cfg.vector_dtype)


def _stored_norms(directory: Path, n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(norms, validation-gradient dots) of a split's feature shards, without reading the vectors; the dots
    are NaN where none was stored."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(shard_path(directory, i), columns=["norm", "target_dot"]) for i in range(n_shards)]
    return (
        np.concatenate([t.column("norm").to_numpy() for t in tables]),
        np.concatenate([t.column("target_dot").to_numpy(zero_copy_only=False) for t in tables]),
    )


def _exact_scores(model, train_groups, val_groups, spec, cfg, pad_id, device, packing):
    """The reference algorithm: full gradients, one backward pass per problem, full-vector dots."""
    params = exact_parameters(model, spec.modules)
    val_norms = []
    val_grad = None
    with console.progress() as bar:
        task = bar.add_task("exact gradients", total=len(val_groups) + len(train_groups), rate="")
        for g in val_groups:
            grad = exact_problem_gradient(
                model, g, params, loss_agg=cfg.loss_agg, pad_id=pad_id, device=device, packing=packing
            ).double()
            n = float(grad.norm())
            val_norms.append(n)
            contrib = grad if cfg.val_agg == "batch" else (grad / n if n > 0 else grad)
            val_grad = contrib if val_grad is None else val_grad + contrib
            bar.advance(task)
        if val_grad is None or float(val_grad.norm()) == 0:
            raise zero_validation_gradient()
        val_grad = val_grad / val_grad.norm()
        dots, norms = [], []
        for g in train_groups:
            grad = exact_problem_gradient(
                model, g, params, loss_agg=cfg.loss_agg, pad_id=pad_id, device=device, packing=packing
            ).double()
            dots.append(float(grad @ val_grad))
            norms.append(float(grad.norm()))
            bar.advance(task)
    model.zero_grad(set_to_none=True)
    return np.array(dots), np.array(norms), np.array(val_norms)


def _score_rows(
    rollouts, split: str, norms, cos, dots, data_sources: dict[str, str], adv: str, contracts: dict[str, bool]
) -> list[dict]:
    """One SCORES row per problem of a rollout stage (problem order), reading only its rewards
    and answer classes; `contracts`: problem id -> whether its judge promises one paid answer."""
    per_problem: dict[str, tuple[list[float], list]] = {}
    for i in range(rollouts.n_shards):  # one shard in memory at a time
        cols = rollouts.shard(i, ["problem_id", "reward", "answer_class"]).to_pydict()
        for pid, reward, answer in zip(cols["problem_id"], cols["reward"], cols["answer_class"]):
            rewards, answers = per_problem.setdefault(pid, ([], []))
            rewards.append(reward)
            answers.append(answer)
    rows = []
    for (pid, (rewards, answers)), n, c, d in zip(per_problem.items(), norms, cos, dots):
        r = np.asarray(rewards, dtype=np.float64)
        zero_advantage = all(a == 0.0 for a in group_advantages(rewards, adv))
        rows.append(
            {
                "problem_id": pid,
                "split": split,
                "data_source": data_sources.get(pid, ""),
                "n_rollouts": len(r),
                "pass_rate": float((r > 0).mean()),
                "reward_mean": float(r.mean()),
                "reward_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
                "zero_advantage": zero_advantage,
                "grad_norm": float(n),
                "score_cos": float(c) if n > 0 else 0.0,
                "score_dot": float(d) if n > 0 else 0.0,
                "judge_consistency": judge_consistency(answers, rewards),
                "paid_answers": paid_answers(answers, rewards),
                "breaks_contract": breaks_contract(contracts.get(pid, False), answers, rewards),
            }
        )
    return rows
