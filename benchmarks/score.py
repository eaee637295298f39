"""Scoring cost: gradsel's features against a plain training step and the exact reference.

    .venv/bin/python -m benchmarks.score [--model tiny|50m|moe|smollm2] [--problems 64] [--k 8] [--repeats 3]
    .venv/bin/python -m benchmarks.score --shape grpo --model 50m --problems 2 --k 16   # shared prompts

Arms, on the same rollouts (fixed seeded token sequences, half the rewards 1):
  (i)   train:     a plain training forward and backward pass with parameter gradients
  (ii)  projected: the hooked pass (16x16 sketch) with the alignment against the validation
                   gradient truncated by SVD, `--alignment lowrank`; the validation gradient's cost
                   is timed apart and compared with the default's whole stage
  (ii') exact-align: the same pass aligned against the full validation gradient (`--alignment exact`)
  (ii'') sketch:   the hooked pass without the alignment (`--alignment sketch`, the default)
  (iii) head:      the output-layer feature, forward only
  (iv)  exact:     full parameter gradients, one backward pass per problem
  (vi)  shared:    the hooked pass with each problem's prompt run once for its k responses
                   (`Packing()`, gradsel's default); every other gradsel arm runs one sequence
                   per rollout (`PLAIN`), today's path before the shared pass
  (v)   bergson:   the peer, EleutherAI's bergson 2.5.1 `bergson build --reward_column` (Dr. GRPO
                   loss, per-module two-sided 16x16 projection) on the same model, tokens and rewards;
                   only with --bergson-python (make its environment with benchmarks/make_bergson_env.sh)
Each arm runs in its own process (so peak RSS is its own): a warm-up, then one timed run. The
arms take turns for `--repeats` rounds, so the machine's slow spells fall on all of them; the
median over rounds and the largest peak RSS are printed, then the ratios. bergson is a CLI
that loads the model and data on every call, so its throughput is the marginal one: the extra
tokens over the extra time of a run on five copies of the rollouts against a run on one copy.

`--shape grpo` is GRPO-shaped work: a prompt of about 300 tokens (a system prompt and a few-shot
preamble) and responses of 100-150 tokens, and only the arms train, sketch and shared (and bergson
on the same rollouts with --bergson-python). `--model smollm2`: SmolLM2-135M-Instruct, converted
once by scripts/smollm2.py. Throughput is always rollout tokens (k (P + R) per problem) per
second, so an arm that runs fewer tokens for the same rollouts shows as faster. The padding each
packing adds is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("train", "projected", "exact-align", "sketch", "head", "exact", "shared")
GRPO_ARMS = ("train", "sketch", "shared")


def build_model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsel.inputs.models import load_causal_lm

    if name == "tiny":
        return load_causal_lm("tiny-arith")
    if name == "smollm2":  # SmolLM2-135M-Instruct, converted once by scripts/smollm2.py
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from smollm2 import default_dir

        if not (default_dir() / "config.json").is_file():
            sys.exit(f"no SmolLM2 checkpoint at {default_dir()}: run scripts/smollm2.py first")
        return load_causal_lm(default_dir())
    torch.manual_seed(0)
    if name == "moe":  # about 50M parameters, a small Mixtral: 8 experts, 2 per token
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=384,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=1024,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
        return MixtralForCausalLM(cfg).eval()
    # about 50M parameters, a small Llama
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).eval()


def make_groups(n_problems: int, k: int, prompt_len: int, response_len: int, vocab: int):
    import numpy as np

    from gradsel.gradients import ProblemRollouts, group_advantages

    rng = np.random.default_rng(0)
    groups = []
    for i in range(n_problems):
        prompt = rng.integers(4, vocab, prompt_len).tolist()
        responses = [
            rng.integers(4, vocab, int(rng.integers(response_len // 2, response_len + 1))).tolist() for _ in range(k)
        ]
        rewards = [float(j % 2) for j in range(k)]
        g = ProblemRollouts(f"p{i}", [prompt] * k, responses, rewards)
        g.advantages = group_advantages(rewards)
        groups.append(g)
    return groups


def make_grpo_groups(n_problems: int, k: int, vocab: int):
    """GRPO-shaped problems: one system prompt and few-shot preamble of 260 tokens shared by every
    problem, a question of 30-50 tokens (prompts of 290-310), responses of 100-150 tokens."""
    import numpy as np

    from gradsel.gradients import ProblemRollouts, group_advantages

    rng = np.random.default_rng(0)
    preamble = rng.integers(4, vocab, 260).tolist()
    groups = []
    for i in range(n_problems):
        prompt = preamble + rng.integers(4, vocab, int(rng.integers(30, 51))).tolist()
        responses = [rng.integers(4, vocab, int(rng.integers(100, 151))).tolist() for _ in range(k)]
        rewards = [float(j % 2) for j in range(k)]
        g = ProblemRollouts(f"p{i}", [prompt] * k, responses, rewards)
        g.advantages = group_advantages(rewards)
        groups.append(g)
    return groups


def padding_share(groups, budget: int, share_prompts: bool) -> tuple[int, int]:
    """(tokens run, of which padding) over the packed batches."""
    from gradsel.gradients import pack_batches

    run = real = 0
    for rows in pack_batches(groups, "seq-mean-token-mean", budget, share_prompts):
        run += len(rows) * max(len(r.ids) for r in rows)
        real += sum(len(r.ids) for r in rows)
    return run, run - real


def workload(model_name: str, n_problems: int, k: int, shape: str = "default"):
    """(model, rollout groups, token count): the same for every arm."""
    model = build_model(model_name)
    if shape == "grpo":
        groups = make_grpo_groups(n_problems, k, model.config.vocab_size)
    else:
        lengths = (8, 8) if model_name == "tiny" else (32, 96)
        groups = make_groups(n_problems, k, *lengths, model.config.vocab_size)
    return model, groups, sum(len(p) + len(r) for g in groups for p, r in zip(g.prompt_ids, g.response_ids))


def run_arm(
    arm: str,
    model_name: str,
    n_problems: int,
    k: int,
    repeats: int,
    budget: int,
    device: str = "cpu",
    dtype: str = "float32",
    shape: str = "default",
) -> dict:
    import torch

    from gradsel.gradients import (
        PLAIN,
        Packing,
        alignment_cost,
        exact_parameters,
        exact_problem_gradient,
        head_features,
        make_spec,
        pack_batches,
        projected_features,
        truncate_validation_gradient,
        validation_gradient,
    )
    from gradsel.gradients.loss import batch_tensors, weighted_nll

    torch.manual_seed(0)
    model, groups, n_tokens = workload(model_name, n_problems, k, shape)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    spec = make_spec(
        model, feature="head" if arm == "head" else "projected", modules=None, sketch=(16, 16), seed=0, dtype=dtype
    )
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    val_grad, extra = None, {}
    if arm in ("projected", "exact-align"):
        # the same packing budget as the pass itself, as `gradsel score` does; a validation set of
        # 8 problems. The default (`--alignment sketch`) computes none of this.
        t = time.perf_counter()
        val_grad = validation_gradient(
            model,
            groups[:8],
            spec.modules,
            loss_agg="seq-mean-token-mean",
            pad_id=0,
            max_tokens=budget,
            device=device,
            packing=PLAIN,
        )
        sync()
        extra["target_s"] = time.perf_counter() - t
        extra["target_mib"] = sum(g.numel() * g.element_size() for g in val_grad) / 2**20
        if arm == "projected":
            t = time.perf_counter()
            val_grad = truncate_validation_gradient(val_grad)
            extra["svd_s"] = time.perf_counter() - t
            extra["alignment_cost"] = alignment_cost(val_grad)

    def once():
        if arm == "train":
            for p in model.parameters():
                p.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            for rows in pack_batches(groups, "seq-mean-token-mean", budget):  # one sequence per rollout
                batch = batch_tensors(rows, 0, device)
                weighted_nll(batch.forward(model).logits, batch.ids, batch.weights).backward()
        elif arm in ("projected", "exact-align", "sketch", "shared"):
            projected_features(
                model,
                groups,
                spec,
                loss_agg="seq-mean-token-mean",
                pad_id=0,
                max_tokens=budget,
                val_grad=val_grad,
                device=device,
                packing=Packing() if arm == "shared" else PLAIN,
            )
        elif arm == "head":
            head_features(
                model,
                groups,
                spec,
                loss_agg="seq-mean-token-mean",
                pad_id=0,
                max_tokens=budget,
                device=device,
                packing=PLAIN,
            )
        else:
            params = exact_parameters(model, [n for n, _ in model.named_parameters()])
            for g in groups:
                exact_problem_gradient(
                    model, g, params, loss_agg="seq-mean-token-mean", pad_id=0, device=device, packing=PLAIN
                )
        sync()

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    if arm == "shared":
        from gradsel.gradients import shared_prompt_support

        assert shared_prompt_support(model) is None, shared_prompt_support(model)  # measure sharing, not its fallback
    median = statistics.median(times)
    return {
        "arm": arm,
        "tokens": n_tokens,
        "median_s": median,
        "tokens_per_s": n_tokens / median,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
    } | extra


def run_bergson(
    python: str, model_name: str, n_problems: int, k: int, repeats: int, budget: int, shape: str = "default"
) -> dict:
    """Time `bergson build` on one and on five copies of the rollouts, each in a fresh process."""
    from gradsel.inputs.models import load_tokenizer

    model, groups, n_tokens = workload(model_name, n_problems, k, shape)
    rows = [
        {"problem_id": g.problem_id, "input_ids": p + r, "labels": [-100] * len(p) + r, "reward": reward}
        for g in groups
        for p, r, reward in zip(g.prompt_ids, g.response_ids, g.rewards)
    ]
    work = Path(tempfile.mkdtemp(prefix="gradsel-bergson-"))
    # bergson refuses a token batch above the model's context (64 for tiny-arith). The longest
    # sequence here is far shorter, and a larger RoPE context computes the same, so raise it.
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, budget)
    model.save_pretrained(work / "model")
    tokenizer = load_tokenizer("tiny-arith")  # the data is pre-tokenized, but bergson loads a tokenizer
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(work / "model")
    for copies in (1, 5):
        with open(work / f"data{copies}.jsonl", "w") as f:
            for _ in range(copies):
                f.writelines(json.dumps(row) + "\n" for row in rows)

    def build(copies: int) -> float:
        cmd = [
            python,
            "-m",
            "bergson",
            "build",
            str(work / f"run{copies}"),
            "--overwrite",
            "true",
            "--model",
            str(work / "model"),
            "--precision",
            "fp32",
            "--dataset",
            str(work / f"data{copies}.jsonl"),
            "--prompt_column",
            "problem_id",
            "--reward_column",
            "reward",
            "--projection_dim",
            "16",
            "--token_batch_size",
            str(budget),
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=os.environ | {"WANDB_MODE": "disabled"})
        return time.perf_counter() - t

    build(1)  # warm-up: file caches, bytecode
    extra = [build(5) - build(1) for _ in range(repeats)]  # the time of 4 more copies
    median = statistics.median(extra)
    return {
        "arm": "bergson",
        "tokens": n_tokens,
        "median_s": median / 4,
        "tokens_per_s": 4 * n_tokens / median,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_rounds(args, arms) -> dict:
    """Interleaved rounds: every arm runs once per round (a fresh process, a warm-up, one timed
    run), so a slow spell of this shared machine hits every arm alike rather than one of them."""
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for arm in arms:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--arm",
                    arm,
                    "--model",
                    args.model,
                    "--problems",
                    str(args.problems),
                    "--k",
                    str(args.k),
                    "--repeats",
                    "1",
                    "--max-tokens-per-batch",
                    str(args.max_tokens_per_batch),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--shape",
                    args.shape,
                ]
                + (["--bergson-python", args.bergson_python] if args.bergson_python else []),
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{out.stderr[-4000:]}")
            runs.setdefault(arm, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(out.stdout.strip().splitlines()[-1], file=sys.stderr, flush=True)  # kept if a later arm fails
    results = {}
    for arm, rs in runs.items():
        median = statistics.median(r["median_s"] for r in rs)
        results[arm] = rs[0] | {
            "median_s": median,
            "tokens_per_s": rs[0]["tokens"] / median,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "all_s": [r["median_s"] for r in rs],
        }
    return results


def grpo_main(args) -> None:
    """The shared-prompt pass on GRPO-shaped work against today's path and a training step."""
    arms = tuple(args.arms or GRPO_ARMS + (("bergson",) if args.bergson_python else ()))
    results = run_rounds(args, arms)
    model = build_model(args.model)
    groups = make_grpo_groups(args.problems, args.k, model.config.vocab_size)
    r0 = results[arms[0]]
    prompts = [len(g.prompt_ids[0]) for g in groups]
    responses = [len(r) for g in groups for r in g.response_ids]
    print(
        f"model {args.model} ({r0['parameters'] / 1e6:.1f}M parameters), GRPO shape: {args.problems} problems x "
        f"{args.k} rollouts, prompts {min(prompts)}-{max(prompts)} tokens, responses {min(responses)}-"
        f"{max(responses)}, {r0['tokens']} rollout tokens, packing budget {args.max_tokens_per_batch} tokens, "
        f"median of {args.repeats}, device {args.device} {args.dtype}\n"
    )
    print("| arm | median s | runs s | rollout tokens/s | peak RSS MiB |")
    print("| --- | ---: | --- | ---: | ---: |")
    for arm, r in results.items():
        print(
            f"| {arm} | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['all_s'])} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    tps = {a: r["tokens_per_s"] for a, r in results.items()}
    print()
    if "shared" in tps:
        if "sketch" in tps:
            print(f"shared / today's path (sketch): {tps['shared'] / tps['sketch']:.2f}")
            print(
                f"shared / today's peak RSS: {results['shared']['peak_rss_mib'] / results['sketch']['peak_rss_mib']:.2f} "
                "(target <= 1)"
            )
        if "train" in tps:
            print(f"shared / training step over the same sequences: {tps['shared'] / tps['train']:.2f} (target >= 2)")
        if "bergson" in tps:
            print(f"shared / bergson: {tps['shared'] / tps['bergson']:.2f} (target >= 2)")
    for share in (False, True):
        run, pad = padding_share(groups, args.max_tokens_per_batch, share)
        print(
            f"packing {'shared' if share else 'one sequence per rollout'}: {run} tokens run for {r0['tokens']} "
            f"rollout tokens, {pad} of them padding ({pad / run:.1%})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "50m", "moe", "smollm2"])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=2048,
        help="packing budget of the batched arms (gradsel's CPU default)",
    )
    ap.add_argument("--bergson-python", help="python of an environment with bergson 2.5.1: adds the peer arm (v)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--shape",
        default="default",
        choices=["default", "grpo"],
        help="grpo: prompts of ~300 tokens, responses of 100-150, arms train, sketch and shared",
    )
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=GRPO_ARMS + ("bergson",),
        help="--shape grpo: these arms, in this order (default train sketch shared [bergson])",
    )
    ap.add_argument("--arm", choices=ARMS + ("bergson",), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = (args.model, args.problems, args.k, args.repeats, args.max_tokens_per_batch)
    if args.arm == "bergson":  # its own process, so RUSAGE_CHILDREN covers the bergson runs alone
        print(json.dumps(run_bergson(args.bergson_python, *sizes, shape=args.shape)))
        return
    if args.arm:
        print(json.dumps(run_arm(args.arm, *sizes, device=args.device, dtype=args.dtype, shape=args.shape)))
        return
    if args.shape == "grpo":
        return grpo_main(args)
    results = run_rounds(args, ARMS + (("bergson",) if args.bergson_python else ()))
    r0 = results["train"]
    print(
        f"model {args.model} ({r0['parameters'] / 1e6:.1f}M parameters), {args.problems} problems x {args.k} "
        f"rollouts, {r0['tokens']} tokens, packing budget {args.max_tokens_per_batch} tokens, median of {args.repeats}\n"
    )
    print("| arm | median s | tokens/s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for arm, r in results.items():
        print(f"| {arm} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    tps = {a: r["tokens_per_s"] for a, r in results.items()}
    print()
    print(f"projected / train throughput: {tps['projected'] / tps['train']:.2f} (target >= 1.0)")
    print(
        f"low-rank alignment cost: {results['projected']['alignment_cost']:.3f} of the exact alignment's multiply-adds"
    )
    print(f"exact-align / train throughput: {tps['exact-align'] / tps['train']:.2f}")
    print(f"sketch-only / train throughput: {tps['sketch'] / tps['train']:.2f}")
    print(f"projected / exact throughput: {tps['projected'] / tps['exact']:.2f} (target >= 20)")
    print(f"head / projected throughput: {tps['head'] / tps['projected']:.2f} (target >= 2)")
    print(f"shared / sketch (today's path) throughput: {tps['shared'] / tps['sketch']:.2f}")
    if "bergson" in tps:
        print(f"projected / bergson throughput: {tps['projected'] / tps['bergson']:.2f} (target >= 1.0)")
        print(f"exact-align / bergson throughput: {tps['exact-align'] / tps['bergson']:.2f}")
        print(f"sketch-only / bergson throughput: {tps['sketch'] / tps['bergson']:.2f}")
    p = results["projected"]
    # A score run on this workload and its validation set: both alignments make the validation
    # vectors (8/64 of a pass); lowrank also forms the validation gradient and truncates it.
    n_val = min(8, args.problems)  # run_arm's validation set: the first 8 problems
    val_share = n_val / args.problems
    lowrank_s = p["median_s"] * (1 + val_share) + p["target_s"] + p["svd_s"]
    sketch_s = results["sketch"]["median_s"] * (1 + val_share)
    print(
        f"default (--alignment sketch) / lowrank, whole score stage on {args.problems} + {n_val} validation problems: "
        f"{sketch_s / lowrank_s:.2f} of the time (lowrank's extra: validation gradient {p['target_s']:.2f} s, "
        f"SVD {p['svd_s']:.2f} s, {p['target_mib']:.0f} MiB float32 held = 4 bytes x captured parameters)"
    )
    print(
        f"projected / train peak RSS: {results['projected']['peak_rss_mib'] / results['train']['peak_rss_mib']:.2f} (target <= 1.2)"
    )


if __name__ == "__main__":
    main()
