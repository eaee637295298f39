"""The `gradsel` command line: parses options and calls the library. Nothing else lives here."""

from __future__ import annotations

import errno
import json
import sys
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from gradsel import __version__
from gradsel.core import choices, console
from gradsel.core.errors import GradselError
from gradsel.selection.formats import REGISTRY as OUTPUT_FORMATS
from gradsel.selection.formats import check_output
from gradsel.selection.modes import REGISTRY as SELECTION_MODES

app = typer.Typer(
    name="gradsel",
    help="Gradient-aligned data selection for LLM reinforcement learning (GradAlign, offline).\n\n"
    "Progress and logs go to stderr and only data to stdout, so every command can feed a pipe. A user "
    "mistake prints `error:` and `hint:` lines and exits with code 2. NO_COLOR is respected. vLLM's, "
    "transformers' and torch's own logs are silenced unless --verbose.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _choice(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An Enum of a choice option's values (gradsel.core.choices), so that --help lists them."""
    return Enum(name, {v: v for v in values}, type=str)


Mode = _choice("Mode", tuple(SELECTION_MODES))
Target = _choice("Target", choices.TARGETS)
Format = _choice("Format", tuple(OUTPUT_FORMATS))
IndexKind = _choice("IndexKind", choices.INDEX_KINDS)
Advantage = _choice("Advantage", choices.ADVANTAGES)
LossAgg = _choice("LossAgg", choices.LOSS_AGGS)
ValAgg = _choice("ValAgg", choices.VAL_AGGS)
Alignment = _choice("Alignment", choices.ALIGNMENTS)
DType = _choice("DType", choices.DTYPES)
Regime = _choice("Regime", choices.REGIMES)
EngineName = _choice("EngineName", choices.ENGINES)
Split = _choice("Split", choices.SPLITS)
HashMode = _choice("HashMode", choices.HASH_MODES)
Executor = _choice("Executor", choices.EXECUTORS)
Feature = _choice("Feature", choices.FEATURES)
Trainer = _choice("Trainer", choices.TRAINERS)

# --help groups options into these panels.
MODEL, DATA, ROLLOUTS, GRADIENTS, SCALE, SELECTION, OUTPUT = (
    "Model",
    "Data",
    "Rollouts",
    "Gradients",
    "Scale",
    "Selection",
    "Output",
)


def _version(value: bool) -> None:
    if value:
        print(f"gradsel {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug detail on stderr.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Gradient-aligned data selection for LLM reinforcement learning.

    Progress and logs go to stderr; only data goes to stdout, so commands can feed a pipe.
    """
    if quiet and verbose:
        raise GradselError("--quiet and --verbose contradict each other", "pass at most one of them")
    console.set_verbosity(quiet=quiet, verbose=verbose)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Directory for pool.parquet and val.parquet.")],
    regime: Annotated[Regime, typer.Option(help="Which of the paper's data regimes to build.")] = Regime.noisy,
    size: Annotated[int, typer.Option(min=1, help="Pool size.")] = 400,
    val_size: Annotated[int, typer.Option(min=1, help="Validation-set size (always clean).")] = 40,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
) -> None:
    """Write a bundled arithmetic pool and validation set (verl Parquet) for one regime.

    The paper's regimes over tiny-arith's tasks: clean; noisy (half the pool judged by a coin flip); imbalance (the validation set's domain is 10% of the pool); low-utility (half the pool trivial identities); wrong-answer (40% of the pool with a plausible wrong reference answer). The rows' extra_info marks the corrupted ones, except in wrong-answer, whose wrong rows are listed only in pool.truth.json beside the pool; benchmarks read these, gradsel never does.
    """
    from gradsel.demo.tasks import write_regime

    pool, val = write_regime(out, regime.value, size=size, val_size=val_size, seed=seed)
    console.info(f"wrote {pool} ({size} problems) and {val} ({val_size} problems), regime {regime.value}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for the demo's files.")] = Path("gradsel-demo"),
    model: Annotated[str, typer.Option(help="Model alias or local directory.")] = "tiny-arith",
    size: Annotated[int, typer.Option(min=1, help="Pool size.")] = 200,
    n: Annotated[int, typer.Option(min=1, help="Rollouts per problem.")] = 8,
    engine: Annotated[
        EngineName, typer.Option(help="Generation engine; auto picks vLLM when installed.")
    ] = EngineName.auto,
    seed: Annotated[int, typer.Option(help="Data and sampling seed.")] = 0,
) -> None:
    """Run the whole pipeline on the bundled tiny model and a noisy arithmetic pool.

    Writes the data, scores it (vLLM when installed), scores it again with exact full gradients as the reference, and selects a quarter of the pool four ways; prints how much of each selection is coin-flip problems, and one JSON object on stdout. About a minute on a 2-core CPU.
    """
    from gradsel.demo.run import run_demo

    console.protect_stdout()
    _emit_json(run_demo(out, model=model, size=size, n=n, engine=engine.value, seed=seed))


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Checkpoint directory (HF format), a PEFT adapter directory, or 'tiny-arith'.",
        rich_help_panel=MODEL,
    ),
]
StoreOpt = Annotated[
    Path, typer.Option("--store", "-s", help="Store directory; created when missing.", rich_help_panel=DATA)
]
HashOpt = Annotated[
    HashMode,
    typer.Option(
        "--hash",
        help="How the checkpoint is identified: every weight byte, or sizes plus first and last MiB.",
        rich_help_panel=MODEL,
    ),
]
CopyOpt = Annotated[
    bool,
    typer.Option(
        "--copy", help="Freeze the checkpoint into the store (hardlinks where possible).", rich_help_panel=MODEL
    ),
]
PromptKeyOpt = Annotated[
    Optional[str], typer.Option(help="Column holding the prompt (default prompt, then input).", rich_help_panel=DATA)
]
AnswerKeyOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Column holding the answer; dots reach into structs (default reward_model.ground_truth, then label).",
        rich_help_panel=DATA,
    ),
]
RewardOpt = Annotated[
    Optional[str],
    typer.Option(
        help="gsm8k, math, math_dapo, int, exact, random, verl or module:function (default: routed as verl routes data_source).",
        rich_help_panel=DATA,
    ),
]
EngineOpt = Annotated[
    EngineName, typer.Option(help="Generation engine; auto picks vLLM when installed.", rich_help_panel=ROLLOUTS)
]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature.", rich_help_panel=ROLLOUTS)]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling threshold.", rich_help_panel=ROLLOUTS)]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="Response length limit in tokens.", rich_help_panel=ROLLOUTS)]
ShardSizeOpt = Annotated[
    int,
    typer.Option(min=1, help="Problems per resumable shard (a killed run redoes at most one).", rich_help_panel=SCALE),
]
TensorParallelOpt = Annotated[
    int, typer.Option(min=1, help="vLLM tensor parallelism: GPUs per engine.", rich_help_panel=SCALE)
]
GpuMemoryOpt = Annotated[
    Optional[float],
    typer.Option(
        min=0.01,
        max=1.0,
        help="vLLM's share of each GPU's memory (default vLLM's; 0.3 on the CPU).",
        rich_help_panel=SCALE,
    ),
]
MaxModelLenOpt = Annotated[
    Optional[int],
    typer.Option(
        min=2, help="vLLM's context length; longer prompts are refused before any rollout.", rich_help_panel=SCALE
    ),
]
ShardOpt = Annotated[
    Optional[str],
    typer.Option(
        help="I/N: make only shards I, I+N, ... beside other processes filling the same store.", rich_help_panel=SCALE
    ),
]


def _store_access(store: Path, part):
    """One writer per store, except `--shard` parts, which share it through per-shard locks."""
    from contextlib import nullcontext

    from gradsel.store.directory import writer_lock

    return nullcontext() if part is not None else writer_lock(store)


@app.command()
def snapshot(
    model: ModelOpt,
    store: StoreOpt,
    copy: CopyOpt = False,
    hash_mode: HashOpt = HashMode.sha256,
) -> None:
    """Record a checkpoint's identity (path, config, content hash) in a store."""
    from gradsel.inputs.snapshot import snapshot_into_store
    from gradsel.store.directory import open_store, writer_lock

    console.protect_stdout()
    with writer_lock(store):
        snap = snapshot_into_store(open_store(store), model, mode=hash_mode.value, copy=copy)
    _emit_json({"store": str(store), "path": snap.path, "content_hash": snap.content_hash})


@app.command()
def check(
    pool: Annotated[Path, typer.Option(help="Candidate problems (verl Parquet or JSONL).", rich_help_panel=DATA)],
    val: Annotated[
        Optional[Path], typer.Option(help="Validation problems, checked the same way.", rich_help_panel=DATA)
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            help="Checkpoint whose chat template and context measure the prompts.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    reward: RewardOpt = None,
    max_prompt_tokens: Annotated[
        Optional[int],
        typer.Option(
            min=1, help="Flag prompts longer than this (default: the model's context less one).", rich_help_panel=MODEL
        ),
    ] = None,
    prompt_key: PromptKeyOpt = None,
    answer_key: AnswerKeyOpt = None,
    sample: Annotated[
        int,
        typer.Option(
            min=0,
            help="Roll out this many problems per data source with --model and print each source's pass rate (0: none).",
            rich_help_panel=ROLLOUTS,
        ),
    ] = 0,
    n: Annotated[
        int, typer.Option("--n", "-k", min=1, help="Rollouts per sampled problem.", rich_help_panel=ROLLOUTS)
    ] = 8,
    engine: EngineOpt = EngineName.auto,
    temperature: TemperatureOpt = 1.0,
    max_tokens: MaxTokensOpt = 1024,
) -> None:
    """Pre-flight: per data source, rows, reward, prompt token lengths; exit 2 on any problem.

    Run it before any GPU time: a reward that does not recognise a data source's answers, or prompts that do not fit the model's context, are found here instead of as zero rewards.

    A table per file on stderr: each data source's rows, the reward that will judge them (verl's routing, docs/trainers.md; every reward with its rows where a row's reward_model.style names another), and with --model its prompt token lengths (min / median / max) under the model's chat template and how many exceed --max-prompt-tokens. Then every problem found, as `problem:` and `hint:` lines: a data source no route knows, a math reference answer math-verify cannot parse, prompts too long. On stdout, one JSON object (ok, and per file its sources and problems). `rollout` and `score` run the same checks before they start an engine, and write nothing to the store when one fails.

    With --sample N (and --model), a file without problems is also rolled out: N problems per data source (a seeded choice), k = --n times each, judged as `score` judges them. Each data source's pass rate is printed, and a `warning:` names every source none of whose sampled rollouts was paid (or all were), with the answer form its reward reads and two responses: a model that never writes `#### N` for a GSM8K judge would lose that whole source from the candidates. `score` gives the same warning after its rollouts (sources with 8 problems or more) and records it in the store.

    The sample also checks the judge's contract: a binary judge that compares an answer with one reference (int, exact, gsm8k, math, math_dapo, verl's routes, a plugin with gradsel_one_answer = True) pays at most one answer per problem. The table gives each source's mixed problems that were paid two different answers, and a `warning:` names a source where that is more than half of them: its reward function ignores the answer. `score` gives the same warning (4 mixed problems or more), records each source's share in the store (`gradsel info`, `gradsel report`), and ranks such problems last in the default selection.
    """
    from gradsel.inputs.problems import read_problems
    from gradsel.rollout.check import check_problem_set, show_reports
    from gradsel.rollout.prompts import prompt_limit

    console.protect_stdout()
    tokenizer, limit = None, max_prompt_tokens
    if model is not None:
        from gradsel.inputs.models import context_length, load_tokenizer

        tokenizer, limit = load_tokenizer(model), prompt_limit(context_length(model), max_prompt_tokens)
    if sample and model is None:
        raise GradselError(
            "--sample rolls problems out with a model, and no --model was given", "pass --model DIR, or drop --sample"
        )
    problem_sets = [
        (split, read_problems(path, prompt_key=prompt_key, answer_key=answer_key))
        for split, path in (("train", pool), ("val", val))
        if path is not None
    ]
    reports = [
        check_problem_set(problem_set, split, reward=reward, tokenizer=tokenizer, limit=limit)
        for split, problem_set in problem_sets
    ]
    show_reports(reports, limit)
    ok = not any(r.findings for r in reports)
    files = [r.to_json() for r in reports]
    if sample:
        files = _check_sample(
            problem_sets,
            reports,
            files,
            model=model,
            per_source=sample,
            reward=reward,
            engine=engine.value,
            n=n,
            temperature=temperature,
            max_tokens=max_tokens,
        )
    _emit_json({"ok": ok, "files": files})
    if not ok:
        raise typer.Exit(2)


def _check_sample(
    problem_sets,
    reports,
    files: list[dict],
    *,
    model: str,
    per_source: int,
    reward,
    engine: str,
    n: int,
    temperature: float,
    max_tokens: int,
) -> list[dict]:
    """`check --sample`: each file without problems gets its sampled pass rates as `sample`."""
    from gradsel.rollout.check import sample_engine, sample_pay, sample_problems, show_sample
    from gradsel.rollout.stage import SamplingConfig

    cfg = SamplingConfig(n=n, temperature=temperature, max_tokens=max_tokens)
    sampler = None  # the engine, started for the first file that is rolled out
    out = []
    for (split, problem_set), report, file in zip(problem_sets, reports, files):
        if report.findings:  # would fail the rollouts; the problems are listed above
            out.append(file | {"sample": None})
            continue
        chosen = sample_problems(problem_set.problems, per_source)
        console.info(f"check --sample: {split}, {len(chosen)} problems x {n} rollouts")
        sampler = sampler or sample_engine(engine, model)
        out.append(file | {"sample": show_sample(split, sample_pay(chosen, sampler, cfg, reward), per_source)})
    return out


@app.command()
def rollout(
    model: ModelOpt,
    problems: Annotated[
        Path,
        typer.Option(
            "--problems", "-p", help="verl Parquet, or JSONL (verl rows or OpenRLHF input/label).", rich_help_panel=DATA
        ),
    ],
    store: StoreOpt,
    n: Annotated[int, typer.Option("--n", "-k", min=1, help="Rollouts per problem.", rich_help_panel=ROLLOUTS)] = 8,
    split: Annotated[
        Split, typer.Option(help="train for candidates, val for the trusted validation set.", rich_help_panel=DATA)
    ] = Split.train,
    engine: EngineOpt = EngineName.auto,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    max_tokens: MaxTokensOpt = 1024,
    seed: Annotated[
        int, typer.Option(help="Sampling seed (per problem: sha256(seed/id)).", rich_help_panel=ROLLOUTS)
    ] = 0,
    reward: RewardOpt = None,
    prompt_key: PromptKeyOpt = None,
    answer_key: AnswerKeyOpt = None,
    hash_mode: HashOpt = HashMode.sha256,
    copy: CopyOpt = False,
    shard_size: ShardSizeOpt = 256,
    shard: ShardOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    max_model_len: MaxModelLenOpt = None,
) -> None:
    """Sample k responses per problem and reward them, into the store (resumable)."""
    from gradsel.inputs.problems import read_problems
    from gradsel.inputs.snapshot import loadable_path, snapshot_into_store
    from gradsel.rollout.stage import SamplingConfig, VLLMOptions, run_rollout_stage, table_pass_rates
    from gradsel.store.directory import open_store, parse_part

    console.protect_stdout()
    part = parse_part(shard) if shard else None
    problem_set = read_problems(problems, prompt_key=prompt_key, answer_key=answer_key)
    st = open_store(store)
    with _store_access(store, part):
        snap = snapshot_into_store(st, model, mode=hash_mode.value, copy=copy)
        cfg = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        shards = run_rollout_stage(
            st,
            split.value,
            problem_set,
            model_path=loadable_path(st, snap),
            model_hash=snap.content_hash,
            cfg=cfg,
            engine=engine.value,
            reward=reward,
            shard_size=shard_size,
            part=part,
            vllm=VLLMOptions(tensor_parallel_size, gpu_memory_utilization, max_model_len),
        )
    if not shards.complete:
        _emit_json(
            {
                "store": str(store),
                "split": split.value,
                "part": str(part),
                "shards": shards.n_shards,
                "shards_done": sum(shards.done(i) for i in range(shards.n_shards)),
            }
        )
        return
    table = shards.table()
    rates = list(table_pass_rates(table).values())
    _emit_json(
        {
            "store": str(store),
            "split": split.value,
            "problems": len(rates),
            "rollouts": table.num_rows,
            "mean_reward": round(sum(rates) / len(rates), 4),
            "nonzero_advantage_share": round(sum(0 < r < 1 for r in rates) / len(rates), 4),
        }
    )


@app.command()
def score(
    model: ModelOpt,
    pool: Annotated[Path, typer.Option(help="Candidate problems (verl Parquet or JSONL).", rich_help_panel=DATA)],
    val: Annotated[
        Path, typer.Option(help="Trusted validation problems (verl Parquet or JSONL).", rich_help_panel=DATA)
    ],
    store: StoreOpt,
    n: Annotated[
        int, typer.Option("--n", "-k", min=2, help="Rollouts per candidate problem.", rich_help_panel=ROLLOUTS)
    ] = 8,
    n_val: Annotated[
        Optional[int],
        typer.Option(min=2, help="Rollouts per validation problem (default --n).", rich_help_panel=ROLLOUTS),
    ] = None,
    engine: EngineOpt = EngineName.auto,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    max_tokens: MaxTokensOpt = 1024,
    reward: RewardOpt = None,
    prompt_key: PromptKeyOpt = None,
    answer_key: AnswerKeyOpt = None,
    sketch: Annotated[
        str, typer.Option(help="Two-sided sketch per module, KOUTxKIN.", rich_help_panel=GRADIENTS)
    ] = "16x16",
    sketch_blocks: Annotated[
        int,
        typer.Option(
            min=1, help="Independent sketches per module, averaged (lower variance).", rich_help_panel=GRADIENTS
        ),
    ] = 1,
    alignment: Annotated[
        Alignment,
        typer.Option(
            help="How score_cos (read by --target mean) is computed: from the sketch, or in the pass against a truncated or full validation gradient.",
            rich_help_panel=GRADIENTS,
        ),
    ] = Alignment("sketch"),
    modules: Annotated[
        Optional[str],
        typer.Option(
            help="Regex over module names (default: every Linear, router and fused expert in the decoder blocks).",
            rich_help_panel=GRADIENTS,
        ),
    ] = None,
    feature: Annotated[
        Feature,
        typer.Option(
            help="projected (hooks), head (output layer, forward only) or exact (full gradients, small models).",
            rich_help_panel=GRADIENTS,
        ),
    ] = Feature.projected,
    share_prompts: Annotated[
        bool,
        typer.Option(
            help="Run each problem's prompt once for its k responses in the gradient pass (the same vectors; where the model cannot, a warning and one sequence per rollout).",
            rich_help_panel=GRADIENTS,
        ),
    ] = True,
    adv: Annotated[
        Advantage, typer.Option(help="Advantage: GRPO, or Dr. GRPO (no std).", rich_help_panel=GRADIENTS)
    ] = Advantage("grpo"),
    loss_agg: Annotated[LossAgg, typer.Option(help="verl's loss_agg_mode.", rich_help_panel=GRADIENTS)] = LossAgg(
        "seq-mean-token-mean"
    ),
    val_agg: Annotated[
        ValAgg,
        typer.Option(
            help="Validation direction: normalised summed gradient, or mean of unit gradients.",
            rich_help_panel=GRADIENTS,
        ),
    ] = ValAgg("batch"),
    dtype: Annotated[
        DType, typer.Option(help="Model dtype for the gradient pass (bfloat16 on a GPU).", rich_help_panel=MODEL)
    ] = DType("float32"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL)] = "auto",
    max_tokens_per_batch: Annotated[
        Optional[int],
        typer.Option(
            min=16,
            help="Tokens in one packed forward/backward pass (default 2048 on the CPU, 16384 on a GPU).",
            rich_help_panel=GRADIENTS,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling and projection seed.", rich_help_panel=ROLLOUTS)] = 0,
    hash_mode: HashOpt = HashMode.sha256,
    copy: CopyOpt = False,
    chunk_size: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Score only the first M problems of a seeded pool order as round 0; `refresh` takes the next.",
            rich_help_panel=DATA,
        ),
    ] = None,
    shard_size: ShardSizeOpt = 256,
    shard: ShardOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    max_model_len: MaxModelLenOpt = None,
    executor: Annotated[
        Executor,
        typer.Option(
            help="local: this process; ray: every shard as a Ray task, one GPU each where there are GPUs.",
            rich_help_panel=SCALE,
        ),
    ] = Executor.local,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            help="With --executor ray: an existing cluster (default: start a local one).", rich_help_panel=SCALE
        ),
    ] = None,
) -> None:
    """Roll out pool and validation set, compute projected GRPO gradients, score alignment.

    Every stage is resumable: rerun the same command after a crash and only missing shards are made (--shard-size problems each). --shard I/N makes only shards I, I+N, ... of the candidates, beside other processes or machines filling the same store; a plain `score` afterwards writes the scores (docs/scale.md). --executor ray runs those parts as Ray tasks, one per GPU (else per CPU), on a local cluster or the one at --ray-address.

    --alignment sketch (the default) computes score_cos, which the --target mean modes read, from the projected vectors at no extra cost; lowrank and exact compute it in the gradient pass against the truncated or full validation gradient, which holds 4 bytes per captured parameter (docs/algorithm.md, section 4). --tensor-parallel-size, --gpu-memory-utilization and --max-model-len go to vLLM; the last also caps the prompt check.

    Each stage's cost (seconds, tokens/s, bytes, peak memory) is recorded in the store; `gradsel info` shows it. Prints one JSON line: store, feature, vector dimension, candidates, non-zero-advantage count.
    """
    from gradsel.gradients.stage import ScoreConfig, parse_sketch
    from gradsel.pipeline.score import RolloutOptions, run_score
    from gradsel.store.directory import parse_part

    console.protect_stdout()
    ro = RolloutOptions(
        n=n,
        n_val=n_val,
        engine=engine.value,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        reward=reward,
        prompt_key=prompt_key,
        answer_key=answer_key,
        hash_mode=hash_mode.value,
        copy=copy,
        shard_size=shard_size,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
    )
    sc = ScoreConfig(
        feature=feature.value,
        sketch=parse_sketch(sketch),
        blocks=sketch_blocks,
        alignment=alignment.value,
        modules=modules,
        adv=adv.value,
        loss_agg=loss_agg.value,
        val_agg=val_agg.value,
        dtype=dtype.value,
        device=device,
        max_tokens_per_batch=max_tokens_per_batch,
        seed=seed,
        share_prompts=share_prompts,
    )
    sc.validate()  # a bad option fails here, before the rollouts
    part = parse_part(shard) if shard else None
    if part is not None and chunk_size is not None:
        raise GradselError("--shard and --chunk-size do not combine", "score round 0 without --shard")
    if executor is Executor.ray and (part is not None or chunk_size is not None):
        raise GradselError("--executor ray makes every shard itself", "drop --shard and --chunk-size")
    with _store_access(store, part):
        if executor is Executor.ray:
            from gradsel.pipeline.ray import run_score_ray

            result = run_score_ray(store, model=model, pool=pool, val=val, ro=ro, sc=sc, address=ray_address)
        elif part is not None:
            run_score(store, model=model, pool=pool, val=val, ro=ro, sc=sc, part=part)
            _emit_json(
                {
                    "store": str(store),
                    "part": str(part),
                    "scores": "run `gradsel score` without --shard once every part is done",
                }
            )
            return
        elif chunk_size is not None:
            from gradsel.pipeline.rounds import start_rounds

            result = start_rounds(
                store, model=model, pool=pool, val=val, ro=ro, sc=sc, chunk_size=chunk_size, order_seed=seed
            )
        else:
            result = run_score(store, model=model, pool=pool, val=val, ro=ro, sc=sc)
    train = [r for r in result.scores.to_pylist() if r["split"] == "train"]
    _emit_json(
        {
            "store": str(store),
            "feature": feature.value,
            "dim": result.spec.dim,
            "candidates": len(train),
            "nonzero_advantage": sum(not r["zero_advantage"] for r in train),
        }
    )


# The selection options: `select`, `refresh` and `report` take the same ones (with_selection_options).
TopKOpt = Annotated[Optional[int], typer.Option(help="Select this many problems.", rich_help_panel=SELECTION)]
RatioOpt = Annotated[
    Optional[float], typer.Option(help="Select this share of the candidates (0-1].", rich_help_panel=SELECTION)
]
AllOpt = Annotated[
    bool, typer.Option("--all", help="Every eligible problem, ranked (a curriculum order).", rich_help_panel=SELECTION)
]
ModeOpt = Annotated[
    Mode, typer.Option(help="How candidates are ranked (the modes are described above).", rich_help_panel=SELECTION)
]
TargetOpt = Annotated[
    Target,
    typer.Option(
        help="What the alignment modes align with; auto is mean for gradalign, dot and simacc (the paper's), subspace for reliable where the store holds vectors.",
        rich_help_panel=SELECTION,
    ),
]
BandOpt = Annotated[str, typer.Option(help="Pass-rate band LO,HI for --mode band.", rich_help_panel=SELECTION)]
MinScoreOpt = Annotated[
    Optional[float], typer.Option(help="Drop candidates whose mode score is below this.", rich_help_panel=SELECTION)
]
ZeroAdvantageOpt = Annotated[
    bool, typer.Option(help="Keep problems whose rewards are all equal (no GRPO signal).", rich_help_panel=SELECTION)
]
BalanceOpt = Annotated[
    Optional[str],
    typer.Option(help="Per-group quotas proportional to the pool, e.g. data_source.", rich_help_panel=SELECTION),
]
BalanceWeightsOpt = Annotated[
    Optional[str],
    typer.Option(help="Quotas from weights instead, e.g. 'gsm8k=0.7,math=0.3'.", rich_help_panel=SELECTION),
]
DiverseOpt = Annotated[
    Optional[float],
    typer.Option(help="MMR trade-off in (0, 1]: lower trades score for gradient diversity.", rich_help_panel=SELECTION),
]
IndexOpt = Annotated[
    IndexKind,
    typer.Option(help="FAISS index for learnalign and --target max; saved in the store.", rich_help_panel=SELECTION),
]
AllowFewerOpt = Annotated[
    bool, typer.Option(help="Take every eligible problem when fewer than asked remain.", rich_help_panel=SELECTION)
]
SelectSeedOpt = Annotated[int, typer.Option(help="Seed for the random and band modes.", rich_help_panel=SELECTION)]
FormatOpt = Annotated[
    Format,
    typer.Option(
        "--format",
        help=choices.english_list((f.help for f in OUTPUT_FORMATS.values()), last=", or ") + ".",
        rich_help_panel=OUTPUT,
    ),
]
OutOpt = Annotated[str, typer.Option(help="Output file, or - for stdout.", rich_help_panel=OUTPUT)]
AnnotateOpt = Annotated[
    bool, typer.Option(help="Add gradsel_rank, gradsel_score and gradsel_mode columns.", rich_help_panel=OUTPUT)
]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite an existing --out file.", rich_help_panel=OUTPUT)]

SELECT_MODES_HELP = (  # the mode records' own lines, and which of them --target concerns
    "Modes: " + "; ".join(f"{m.name} {m.help}" for m in SELECTION_MODES.values()) + ".\n\n"
    f"Targets (for {choices.english_list(m.name for m in SELECTION_MODES.values() if m.honours_target)}): "
    "subspace, per module the share of the candidate's gradient in the span of the validation gradients, averaged "
    "over modules; mean, the cosine with the validation set's gradient; max, the best cosine with any single validation problem (LESS-style, through the FAISS index); "
    "auto, the default, is mean for the paper's modes (gradalign, dot, simacc), so that --mode gradalign is the "
    "paper's method as published, and subspace for reliable, gradsel's own default (mean where the store holds no "
    "vectors: the exact feature). "
    + choices.english_list(m.name for m in SELECTION_MODES.values() if not m.honours_target)
    + " read no target."
)


@dataclass(frozen=True)
class SelectionOptions:
    """What a user asked `select`, `refresh` or `report` to select, as parsed by typer."""

    top_k: Optional[int]
    ratio: Optional[float]
    all_: bool
    mode: Enum
    target: Enum
    band: str
    min_score: Optional[float]
    include_zero_advantage: bool
    balance: Optional[str]
    balance_weights: Optional[str]
    diverse: Optional[float]
    index: Enum
    allow_fewer: bool
    seed: int

    @property
    def asked(self) -> bool:
        """Whether a size was given (--top-k, --ratio or --all)."""
        return self.top_k is not None or self.ratio is not None or self.all_

    def config(self, default_ratio: float | None = None):
        from gradsel.selection.select import SelectConfig, parse_band, parse_weights

        ratio = self.ratio if self.asked else default_ratio
        return SelectConfig(
            mode=self.mode.value,
            top_k=self.top_k,
            ratio=ratio,
            all=self.all_,
            band=parse_band(self.band),
            min_score=self.min_score,
            include_zero_advantage=self.include_zero_advantage,
            balance=self.balance,
            balance_weights=parse_weights(self.balance_weights) if self.balance_weights else None,
            diverse=self.diverse,
            target=self.target.value,
            index=self.index.value,
            seed=self.seed,
            allow_fewer=self.allow_fewer,
        )


SELECTION_OPTIONS = {  # parameter: (annotation, default), in --help's order
    "top_k": (TopKOpt, None),
    "ratio": (RatioOpt, None),
    "all_": (AllOpt, False),
    "mode": (ModeOpt, Mode("reliable")),
    "target": (TargetOpt, Target("auto")),
    "band": (BandOpt, "0.0,1.0"),
    "min_score": (MinScoreOpt, None),
    "include_zero_advantage": (ZeroAdvantageOpt, False),
    "balance": (BalanceOpt, None),
    "balance_weights": (BalanceWeightsOpt, None),
    "diverse": (DiverseOpt, None),
    "index": (IndexOpt, IndexKind("auto")),
    "allow_fewer": (AllowFewerOpt, False),
    "seed": (SelectSeedOpt, 0),
}


def with_selection_options(command):
    """Give a command every selection option, declared once here: typer reads the signature
    built below, and the command receives them as one `selection: SelectionOptions`."""
    import functools
    import inspect

    hints = typing.get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=hints[p.name])
        for p in inspect.signature(command).parameters.values()
        if p.name != "selection"
    ]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for name, (annotation, default) in SELECTION_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        chosen = {name: kwargs.pop(name) for name in SELECTION_OPTIONS}
        return command(**kwargs, selection=SelectionOptions(**chosen))

    wrapper.__signature__ = inspect.Signature([*own, *added])
    wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
    return wrapper


@app.command(
    "select",
    help="Emit the best problems for the next round, unchanged, in the trainer's format.\n\n"
    "Rows come out in rank order, best first, exactly as they came in: verl Parquet rows are taken from the "
    "original table, JSONL lines are copied byte for byte. A file output gets a selection manifest beside it "
    "(OUT.gradsel.json: mode, parameters, spec, checkpoint, counts). With the defaults (--format verl --out -) "
    "the Parquet bytes go to stdout for a pipe; in a terminal gradsel refuses before any work.\n\n"
    + SELECT_MODES_HELP
    + "\n\n"
    "--balance data_source keeps per-group quotas proportional to the eligible pool; --balance-weights "
    "gsm8k=0.7,math=0.3 sets them instead (groups not named get none), and a group short of its quota gives "
    "the rest to the others. --index chooses the FAISS index over the candidate vectors for learnalign and "
    "--target max: saved in the store and rebuilt when the vectors change (docs/store.md).",
)
@with_selection_options
def select_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="A scored store.", rich_help_panel=DATA)],
    fmt: FormatOpt = Format("verl"),
    out: OutOpt = "-",
    annotate: AnnotateOpt = False,
    force: ForceOpt = False,
    selection: SelectionOptions = None,
) -> None:
    from gradsel.pipeline.rounds import latest_round_store, select_emit_record
    from gradsel.store.directory import existing_store

    console.protect_stdout()
    cfg = selection.config()
    round_store = latest_round_store(store)
    existing_store(round_store)  # a clear error where no store is
    check_output(out, fmt.value, force)
    chosen, n = select_emit_record(store, round_store, cfg, fmt=fmt.value, out=out, annotate=annotate, force=force)
    console.info(
        f"selected {n} of {chosen.eligible} eligible problems ({cfg.mode}) -> {'stdout' if out == '-' else out}"
    )


@app.command()
def info(
    store: Annotated[Path, typer.Option("--store", "-s", help="A store directory.", rich_help_panel=DATA)],
) -> None:
    """Show what a store holds: checkpoint, rollouts, warnings about the data, spec, pass rates, per-stage cost, rounds."""
    from gradsel.review.summary import show_store, store_summary

    console.protect_stdout()
    summary = store_summary(store)
    show_store(summary)
    _emit_json(summary)


@app.command(
    help="Write a self-contained HTML report of a store, with plots.\n\n"
    "Pass rates, the selection's scores, what each mode would keep, judge consistency and alignment, "
    "rounds, per-stage cost and provenance. The file needs no network to view. The selection options choose what the report marks as selected "
    "(default: --ratio 0.1 of the default mode).\n\n" + SELECT_MODES_HELP
)
@with_selection_options
def report(
    store: Annotated[Path, typer.Option("--store", "-s", help="A scored store.", rich_help_panel=DATA)],
    out: Annotated[Path, typer.Option(help="The HTML file to write.", rich_help_panel=OUTPUT)] = Path(
        "gradsel-report.html"
    ),
    force: ForceOpt = False,
    selection: SelectionOptions = None,
) -> None:
    from gradsel.review.report import write_report
    from gradsel.review.summary import human_bytes
    from gradsel.store.directory import existing_store

    console.protect_stdout()
    cfg = selection.config(default_ratio=0.1)
    cfg.validate()
    existing_store(store)
    size = write_report(store, out, cfg, force=force)
    console.info(f"wrote {out} ({human_bytes(size)})")
    _emit_json({"store": str(store), "report": str(out), "bytes": size})


@app.command(
    help="Next round: snapshot the new checkpoint, score the next chunk, select, emit.\n\n"
    "With --top-k, --ratio or --all it also selects from the new round, with the same options as "
    "`gradsel select`.\n\n" + SELECT_MODES_HELP
)
@with_selection_options
def refresh(
    store: Annotated[
        Path, typer.Option("--store", "-s", help="A store made by `score --chunk-size`.", rich_help_panel=DATA)
    ],
    model: ModelOpt,
    chunk_size: Annotated[
        Optional[int],
        typer.Option(min=1, help="Problems in the next chunk (default: the store's).", rich_help_panel=DATA),
    ] = None,
    reuse_unselected: Annotated[
        bool,
        typer.Option(help="Offer problems that earlier rounds scored but did not select again.", rich_help_panel=DATA),
    ] = False,
    restart_round: Annotated[
        bool,
        typer.Option(
            help="Drop an incomplete last round (a refresh that failed) and score its chunk with --model.",
            rich_help_panel=DATA,
        ),
    ] = False,
    fmt: FormatOpt = Format("verl"),
    out: OutOpt = "-",
    annotate: AnnotateOpt = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Rescore even when the checkpoint is identical to the last round's; overwrite --out.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    selection: SelectionOptions = None,
) -> None:
    from gradsel.pipeline.rounds import refresh as refresh_round
    from gradsel.pipeline.rounds import round_dir, select_emit_record
    from gradsel.store.directory import writer_lock

    console.protect_stdout()
    cfg = selection.config()
    if selection.asked:
        cfg.validate()  # fail before any work
        check_output(out, fmt.value, force)
    # The selection is made and recorded under the lock the round was scored under: released in
    # between, another writer could change the round before its selection is recorded into it.
    with writer_lock(store):
        index, result = refresh_round(
            store,
            model=model,
            chunk_size=chunk_size,
            reuse_unselected=reuse_unselected,
            force=force,
            restart_round=restart_round,
        )
        summary = {
            "store": str(store),
            "round": index,
            "candidates": sum(r["split"] == "train" for r in result.scores.to_pylist()),
        }
        if selection.asked:
            chosen, _ = select_emit_record(
                store, round_dir(store, index), cfg, fmt=fmt.value, out=out, annotate=annotate, force=force
            )
            summary["selected"] = len(chosen.problem_ids)
    if out != "-" or not selection.asked:
        _emit_json(summary)
    else:
        console.info(json.dumps(summary))


@app.command(
    help="Find reference answers (keys) that look wrong, with the evidence and the key to use instead.\n\n"
    "Reads the store's train rollouts (every round's, in a rounds store). Signals per problem: the "
    "plurality answer's share of the rollouts against the key's, when the judge does not pay the "
    "plurality answer; across rounds, how much faster that answer's share grew than the key's; another "
    "problem with the same question (lowercase, no punctuation or extra whitespace) and a different key; "
    "with --teach-steps N, a copy of the checkpoint fine-tuned N steps on the validation rows' answers, "
    "which scores the key against the rollouts' other answers. Their mean, plus half the duplicate "
    "signal, is the suspicion; a problem at --threshold or above is a suspect. Prints a table of suspects "
    "on stderr and one JSON line on stdout; --out writes every suspect's evidence and proposed key "
    "(Parquet, or JSON lines for .jsonl); --fix writes a copy of the pool with the proposed keys of the "
    "suspects, every other byte of a JSON-lines row and every other Parquet column unchanged, and lists "
    "each change on stderr and in FIX.changes.jsonl beside it. Never edits the pool (docs/audit.md)."
)
def audit(
    store: Annotated[
        Path,
        typer.Option("--store", "-s", help="A store with train rollouts (`rollout` or `score`).", rich_help_panel=DATA),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Write the suspects' evidence and proposed keys here: .parquet, or .jsonl.", rich_help_panel=OUTPUT
        ),
    ] = None,
    fix: Annotated[
        Optional[Path],
        typer.Option(
            help="Write a copy of the pool with the suspects' proposed keys here (the pool's format).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    pool: Annotated[
        Optional[Path],
        typer.Option(
            help="The pool the store was made from, for --fix (default: the one the store records).",
            rich_help_panel=DATA,
        ),
    ] = None,
    val: Annotated[
        Optional[Path],
        typer.Option(
            help="Validation rows to teach with (default: the store's validation rollouts' problems).",
            rich_help_panel=DATA,
        ),
    ] = None,
    answer_key: AnswerKeyOpt = None,
    threshold: Annotated[
        float, typer.Option(help="Suspicion at or above which a problem is a suspect.", rich_help_panel=SELECTION)
    ] = 0.6,
    teach_steps: Annotated[
        int,
        typer.Option(
            help="Steps of the taught copy (full-parameter AdamW on the validation answers); 0 skips it.",
            rich_help_panel=GRADIENTS,
        ),
    ] = 0,
    teach_lr: Annotated[
        float, typer.Option(help="Learning rate of the taught copy.", rich_help_panel=GRADIENTS)
    ] = 1e-4,
    teach_template: Annotated[
        str, typer.Option(help="The response text a key stands for, e.g. '#### {answer}'.", rich_help_panel=GRADIENTS)
    ] = "{answer}",
    seed: Annotated[int, typer.Option(help="Seed of the taught copy.", rich_help_panel=GRADIENTS)] = 0,
    force: ForceOpt = False,
) -> None:
    from gradsel.review.audit import AuditConfig, run_audit

    console.protect_stdout()
    cfg = AuditConfig(
        threshold=threshold, teach_steps=teach_steps, teach_lr=teach_lr, teach_template=teach_template, seed=seed
    )
    _emit_json(run_audit(store, cfg, out=out, fix=fix, pool=pool, val=val, answer_key=answer_key, force=force))


@app.command(
    help="Hand the store's latest selection to a trainer's relaunch. `gradsel handoff verl`: write the "
    "latest round's recorded selection as verl Parquet, move the stale dataloader state of the latest "
    "checkpoint (global_step_N/data.pt) aside, kept, so that the resumed run reads the new file from its "
    "beginning, and print the overrides for verl's launcher on stdout (docs/trainers.md)."
)
def handoff(
    trainer: Annotated[Trainer, typer.Argument(help="The trainer to relaunch.")],
    store: Annotated[
        Path,
        typer.Option(
            "--store", "-s", help="A store with rounds whose latest round has a selection.", rich_help_panel=DATA
        ),
    ],
    checkpoints: Annotated[
        Path,
        typer.Option(
            help="verl's trainer.default_local_dir: holds latest_checkpointed_iteration.txt and global_step_N/.",
            rich_help_panel=DATA,
        ),
    ],
    train_batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="The data.train_batch_size (or data.gen_batch_size) you launch verl with: sets the steps per epoch of the new file.",
            rich_help_panel=DATA,
        ),
    ],
    epochs: Annotated[
        int, typer.Option(min=1, help="Passes over the new file before the resumed run stops.", rich_help_panel=DATA)
    ] = 1,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="The Parquet to write (default: CHECKPOINTS/gradsel-round-NNN.parquet).", rich_help_panel=OUTPUT
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    from gradsel.integrations.verl import prepare_relaunch

    done = prepare_relaunch(store, checkpoints, out, train_batch_size=train_batch_size, epochs=epochs, force=force)
    console.info(
        f"wrote {done.parquet}: round {done.round}'s selection, {done.rows} problems, "
        f"{done.steps_per_epoch} steps an epoch"
    )
    moved = (
        f"moved its dataloader state aside to {done.moved_state}"
        if done.moved_state
        else f"its dataloader state was already moved aside to {done.moved_before}"
        if done.moved_before
        else "it holds no dataloader state (data.pt)"
    )
    console.info(f"resuming {done.checkpoint.name}: {moved}")
    print(" ".join(done.overrides), file=console.data_out(), flush=True)


def _emit_json(obj) -> None:
    """Data goes to stdout, one JSON object, so it can be piped."""
    print(json.dumps(obj), file=console.data_out(), flush=True)


def main() -> None:
    """Entry point: user mistakes become `error:` + `hint:` on stderr and exit code 2."""
    import signal

    if len(sys.argv) <= 1:  # bare `gradsel`: the help, as a request for it, not a usage error
        sys.argv.append("--help")
    # A shell starts a background job (`gradsel score ... &`) with SIGINT ignored, and Python then
    # keeps ignoring it: a scheduler's or a user's interrupt must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
    except GradselError as exc:
        _fail(exc.message, exc.hint)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.stderr.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: bad option, missing value, no such command
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "gradsel"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(message, f"run `{command} --help`")
    except KeyboardInterrupt:
        _interrupted()
    except PermissionError as exc:
        _fail(
            f"permission denied: {exc.filename or 'a file'}",
            "choose a --store, --out or input you can use, or fix its permissions; finished shards are kept",
        )
    except OSError as exc:
        if exc.errno == errno.EROFS:
            _fail(
                f"{exc.filename or 'a file'} is on a read-only file system",
                "choose a --store or --out on a writable file system; finished shards are kept",
            )
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # Every write is to a temporary name that is renamed only when whole, so the store holds
        # finished files only: the same command resumes once there is room.
        _fail(
            f"no space left to write {exc.filename or 'a file'} ({exc.strerror})",
            "free disk space (or raise the quota), then rerun the same command: finished shards are kept",
        )
    if code == 130:  # typer turns Ctrl-C into a returned 130 (non-standalone mode)
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted() -> None:
    console.stderr.print(
        "interrupted: every finished shard is kept; rerun the same command to resume", markup=False, highlight=False
    )
    sys.exit(130)


def _fail(message: str, hint: str) -> None:
    text = f"error: {message}"
    if hint:
        text += f"\nhint: {hint}"
    console.stderr.print(text, markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
