"""The scoring stage: per-problem gradient features, the validation target, and alignment scores.

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

from gradsel import console
from gradsel.errors import GradselError
from gradsel.rewards import judge_consistency
from gradsel.gradients import (ADVANTAGES, LOSS_AGGS, LOW_RANK_MAX_COST, LOW_RANK_RESIDUAL, LOW_RANK_TILE,
                               ProjectorSpec, exact_parameters, exact_problem_gradient, groups_from_table, head_features,
                               low_rank_target, make_spec, projected_features, target_gradient,
                               zero_validation_gradient)

VAL_AGGS = ("batch", "mean-normalized")
DTYPES = ("float32", "bfloat16", "float16")
ALIGNMENTS = ("lowrank", "exact", "sketch")


@dataclass(frozen=True)
class ScoreConfig:
    feature: str = "projected"
    sketch: tuple[int, int] = (16, 16)  # (k_out, k_in) per module
    blocks: int = 1  # independent sketches per module
    modules: str | None = None  # regex over module names; None = every Linear, router and expert stack in the decoder blocks
    adv: str = "grpo"
    loss_agg: str = "seq-mean-token-mean"
    val_agg: str = "batch"
    dtype: str = "float32"
    device: str = "auto"
    max_tokens_per_batch: int | None = None  # None: 2048 on the CPU, 16384 on a GPU (measured, docs/benchmarks.md)
    seed: int = 0
    vector_dtype: str = "float16"
    shard_size: int = 256  # problems per feature shard
    # <g_p, g_V> in the hooked pass (projected feature only): exact, against the full validation
    # gradient; lowrank, against its SVD truncation (gradients.low_rank_target); sketch: from the
    # projected vectors alone.
    alignment: str = "lowrank"

    def validate(self) -> None:
        for value, allowed, flag in ((self.adv, ADVANTAGES, "--adv"), (self.loss_agg, LOSS_AGGS, "--loss-agg"),
                                     (self.val_agg, VAL_AGGS, "--val-agg"), (self.alignment, ALIGNMENTS, "--alignment")):
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
                raise GradselError(f"--modules {self.modules!r} is not a regular expression ({exc})",
                                   "for example --modules 'mlp|self_attn'") from exc


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


def validation_target(unit_vectors: np.ndarray, norms: np.ndarray, val_agg: str) -> np.ndarray:
    """The unit validation direction: normalised sum of gradients (`batch`) or normalised mean
    of the per-problem unit gradients (`mean-normalized`)."""
    if val_agg == "batch":
        target = (unit_vectors.astype(np.float64) * norms[:, None]).sum(axis=0)
    else:
        target = unit_vectors[norms > 0].astype(np.float64).sum(axis=0)
    n = np.linalg.norm(target)
    if n == 0:
        raise zero_validation_gradient()
    return target / n


def score_stage(store, *, model_path: Path, model_hash: str, train_rollouts, val_rollouts,
                data_sources: dict[str, dict[str, str]], cfg: ScoreConfig):
    """Compute (or resume) features and scores; return the scores table (schema.SCORES)."""
    import pyarrow as pa

    from gradsel.fsutil import atomic_write_json, atomic_write_table
    from gradsel.models import load_causal_lm, load_tokenizer
    from gradsel.schema import SCORES
    from gradsel.store import check_stage_key, mark_stage_complete, stable_key, stage_complete

    cfg.validate()
    if cfg.feature != "projected":  # --alignment applies to the projected feature; record what the others do
        cfg = replace(cfg, alignment="exact" if cfg.feature == "exact" else "sketch")
    device = resolve_device(cfg.device)
    if cfg.max_tokens_per_batch is None:
        # On the CPU, small packed batches are several times faster (cache-resident activations
        # and logits); a GPU wants large ones.
        cfg = replace(cfg, max_tokens_per_batch=2048 if device == "cpu" else 16384)
    model = load_causal_lm(model_path, dtype=cfg.dtype, device=device)
    pad_id = load_tokenizer(model_path).pad_token_id
    spec = make_spec(model, feature=cfg.feature, modules=cfg.modules, sketch=cfg.sketch, seed=cfg.seed,
                     dtype=cfg.dtype, blocks=cfg.blocks)
    console.debug(f"projector: {cfg.feature}, {len(spec.modules)} modules, vector dim {spec.dim}, device {device}, "
                  f"{cfg.max_tokens_per_batch} tokens per packed pass")
    train_groups = groups_from_table(train_rollouts, cfg.adv)
    val_groups = groups_from_table(val_rollouts, cfg.adv)
    method = asdict(cfg) | {"device": None, "shard_size": None, "max_tokens_per_batch": None}  # numbers unchanged
    if cfg.alignment == "lowrank":  # the truncation rule sets the scores too
        method["low_rank"] = {"residual": LOW_RANK_RESIDUAL, "max_cost": LOW_RANK_MAX_COST, "tile": LOW_RANK_TILE,
                              "ranks": "global"}
    key = stable_key({"model": model_hash, "spec": spec.to_dict(), "cfg": method,
                      "train": _table_digest(train_rollouts), "val": _table_digest(val_rollouts)})
    feature_id = stable_key({"spec": spec.to_dict(), "cfg": method})[:16]
    stage = store.stage_dir("features", feature_id)
    if stage_complete(stage, key):
        import pyarrow.parquet as pq

        console.info(f"features/{feature_id}: complete, reused")
        _point_manifest_at(store, spec, cfg, feature_id)  # a run killed after the stage, before this
        return pq.read_table(stage / "scores.parquet"), spec
    check_stage_key(stage, key, "features")
    atomic_write_json(stage / "spec.json", {"projector": spec.to_dict(), "loss": {"adv": cfg.adv, "loss_agg": cfg.loss_agg},
                                            "val_agg": cfg.val_agg, "alignment": cfg.alignment,
                                            "vector_dtype": cfg.vector_dtype})

    if cfg.feature == "exact":
        dots, norms_train, norms_val = _exact_scores(model, train_groups, val_groups, spec, cfg, pad_id, device)
        cos = _safe_div(dots, norms_train)
        val_dots = np.zeros(len(val_groups))
        val_cos = np.zeros(len(val_groups))
    elif cfg.alignment in ("exact", "lowrank") and cfg.feature == "projected":
        # Vectors from the sketch (for the index); alignment against the full g_V or its truncation.
        _, norms_val, _ = _feature_split(stage / "val", model, val_groups, spec, cfg, pad_id, device, "val")
        scales = None if cfg.val_agg == "batch" else [1 / n if n > 0 else 0.0 for n in norms_val]
        target = target_gradient(model, val_groups, spec.modules, loss_agg=cfg.loss_agg, pad_id=pad_id,
                                 device=device, max_tokens=cfg.max_tokens_per_batch, scales=scales)
        if cfg.alignment == "lowrank":
            target = low_rank_target(target)
        _, norms_train, dots = _feature_split(stage / "train", model, train_groups, spec, cfg, pad_id, device,
                                              "train", target=target)
        _, val_dots = projected_features(model, val_groups, spec, loss_agg=cfg.loss_agg, pad_id=pad_id,
                                         device=device, max_tokens=cfg.max_tokens_per_batch, target=target)
        cos = _safe_div(dots, norms_train)
        val_cos = _safe_div(val_dots, norms_val)
    else:
        unit_train, norms_train, _ = _feature_split(stage / "train", model, train_groups, spec, cfg, pad_id, device, "train")
        unit_val, norms_val, _ = _feature_split(stage / "val", model, val_groups, spec, cfg, pad_id, device, "val")
        target = validation_target(unit_val, norms_val, cfg.val_agg)
        cos = unit_train.astype(np.float64) @ target
        dots = cos * norms_train
        val_cos = unit_val.astype(np.float64) @ target
        val_dots = val_cos * norms_val
    rows = _score_rows(train_groups, "train", norms_train, cos, dots, data_sources["train"])
    rows += _score_rows(val_groups, "val", norms_val, val_cos, val_dots, data_sources["val"])
    table = pa.Table.from_pylist(rows, schema=SCORES)
    atomic_write_table(stage / "scores.parquet", table)
    mark_stage_complete(stage, key, train=len(train_groups), val=len(val_groups))
    _point_manifest_at(store, spec, cfg, feature_id)
    return table, spec


def _point_manifest_at(store, spec: ProjectorSpec, cfg: ScoreConfig, feature_id: str) -> None:
    """Make these features the store's current ones (what `select` and `info` read)."""
    store.update_manifest(projector=spec.to_dict(), loss={"adv": cfg.adv, "loss_agg": cfg.loss_agg},
                          val_agg=cfg.val_agg, alignment=cfg.alignment, features=f"features/{feature_id}")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _table_digest(table) -> str:
    from gradsel.store import stable_key

    cols = table.select(["problem_id", "sample", "reward"]).to_pydict()
    return stable_key([cols, table.column("response_token_ids").to_pylist()])


def _feature_split(directory: Path, model, groups, spec: ProjectorSpec, cfg: ScoreConfig, pad_id: int,
                   device: str, label: str, target=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features of one split, shard by shard (resumable); returns (unit vectors, norms, exact
    dots with `target` or None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsel.schema import vectors_schema
    from gradsel.store import shard_done, write_shard

    directory.mkdir(parents=True, exist_ok=True)
    schema = vectors_schema(spec.dim, cfg.vector_dtype)
    n_shards = max(1, (len(groups) + cfg.shard_size - 1) // cfg.shard_size)
    compute = projected_features if spec.feature == "projected" else head_features
    todo = [i for i in range(n_shards) if not shard_done(directory, i)]
    with console.progress() as bar:
        task = bar.add_task(f"gradients/{label} ({spec.feature}, {spec.k_out}x{spec.k_in})", total=len(groups),
                            completed=(n_shards - len(todo)) * cfg.shard_size if todo else len(groups), rate="")
        start, tokens = time.perf_counter(), 0

        def tick(n_seqs: int, n_tokens: int) -> None:
            nonlocal tokens
            tokens += n_tokens
            bar.update(task, rate=f"{tokens / (time.perf_counter() - start):.0f} tokens/s")

        for i in todo:
            shard = groups[i * cfg.shard_size:(i + 1) * cfg.shard_size]
            kwargs = {"target": target} if target is not None else {}
            out = compute(model, shard, spec, loss_agg=cfg.loss_agg, pad_id=pad_id, device=device,
                          max_tokens=cfg.max_tokens_per_batch, progress=tick, **kwargs)
            feats, dots = out if target is not None else (out, None)
            unit, norms = _unit(feats)
            table = pa.table({"problem_id": [g.problem_id for g in shard],
                              "vector": pa.FixedSizeListArray.from_arrays(
                                  pa.array(unit.reshape(-1).astype(np.float16 if cfg.vector_dtype == "float16" else np.float32)),
                                  spec.dim),
                              "norm": norms,
                              "target_dot": pa.array(dots, pa.float64()) if dots is not None
                              else pa.nulls(len(shard), pa.float64())}).cast(schema)
            write_shard(directory, i, table)
            bar.advance(task, len(shard))
    tables = [pq.read_table(directory / f"shard-{i:05d}.parquet", memory_map=True) for i in range(n_shards)]
    vectors = np.concatenate([t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                              .reshape(t.num_rows, spec.dim) for t in tables]).astype(np.float32)
    norms = np.concatenate([t.column("norm").to_numpy() for t in tables])
    dots = (np.concatenate([t.column("target_dot").to_numpy(zero_copy_only=False) for t in tables])
            if target is not None else None)
    return vectors, norms, dots


def _exact_scores(model, train_groups, val_groups, spec, cfg, pad_id, device):
    """The reference algorithm: full gradients, one backward pass per problem, full-vector dots."""
    params = exact_parameters(model, spec.modules)
    val_norms = []
    target = None
    with console.progress() as bar:
        task = bar.add_task("exact gradients", total=len(val_groups) + len(train_groups), rate="")
        for g in val_groups:
            grad = exact_problem_gradient(model, g, params, loss_agg=cfg.loss_agg, pad_id=pad_id, device=device).double()
            n = float(grad.norm())
            val_norms.append(n)
            contrib = grad if cfg.val_agg == "batch" else (grad / n if n > 0 else grad)
            target = contrib if target is None else target + contrib
            bar.advance(task)
        if target is None or float(target.norm()) == 0:
            raise zero_validation_gradient()
        target = target / target.norm()
        dots, norms = [], []
        for g in train_groups:
            grad = exact_problem_gradient(model, g, params, loss_agg=cfg.loss_agg, pad_id=pad_id, device=device).double()
            dots.append(float(grad @ target))
            norms.append(float(grad.norm()))
            bar.advance(task)
    model.zero_grad(set_to_none=True)
    return np.array(dots), np.array(norms), np.array(val_norms)


def _score_rows(groups, split: str, norms, cos, dots, data_sources: dict[str, str]) -> list[dict]:
    rows = []
    for g, n, c, d in zip(groups, norms, cos, dots):
        r = np.asarray(g.rewards, dtype=np.float64)
        rows.append({
            "problem_id": g.problem_id, "split": split, "data_source": data_sources.get(g.problem_id, ""),
            "n_rollouts": len(r), "pass_rate": float((r > 0).mean()), "reward_mean": float(r.mean()),
            "reward_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0, "zero_advantage": g.zero_advantage,
            "grad_norm": float(n), "score_cos": float(c) if n > 0 else 0.0, "score_dot": float(d) if n > 0 else 0.0,
            "judge_consistency": judge_consistency(g.answer_classes, g.rewards),
        })
    return rows
