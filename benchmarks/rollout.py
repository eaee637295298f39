"""Rollout overhead: gradsel's rollout stage against a bare `vllm.LLM.generate`, side by side.

    .venv/bin/python -m benchmarks.rollout [--size 400] [--n 8] [--repeats 3]

One vLLM engine serves both arms, so engine start-up is excluded from both. The gradsel arm
does everything `gradsel rollout` does per shard: chat-template encoding, generation, rewards,
Parquet shards with checksummed markers. The arms alternate and medians are reported. The
transformers engine runs the same prompts once more for a throughput comparison.

    .venv/bin/python -m benchmarks.rollout --hf-only --data gsm8k --model DIR [--size 8] [--n 8]

only times the transformers engine (`HFEngine.generate`, the model loaded once, one warm-up
problem), here on verl GSM8K rows with a system prompt (tests/verl_data.py: 80+ prompt tokens
under a chat model's template), median of --repeats, in wall and in CPU seconds (this process's:
steadier than wall time on a shared machine; set OMP_NUM_THREADS=1 to compare them). Run it
with PYTHONPATH pointing at another checkout of gradsel to time that checkout's engine on the same
prompts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from gradsel.demo.tasks import write_regime
from gradsel.inputs.models import resolve_model_path
from gradsel.inputs.problems import read_problems
from gradsel.rollout.prompts import encode_prompts
from gradsel.rollout.stage import HFEngine, SamplingConfig, VLLMEngine, problem_seed, run_rollout_stage
from gradsel.store.directory import open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-arith")
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-only", action="store_true", help="time only the transformers engine")
    ap.add_argument(
        "--data",
        choices=("arith", "gsm8k"),
        default="arith",
        help="problems for --hf-only: the bundled arithmetic, or GSM8K word problems",
    )
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    if args.hf_only:
        hf_only(args)
        return

    from vllm import SamplingParams

    model = resolve_model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="gradsel-bench-"))
    pool, _ = write_regime(work / "data", "clean", size=args.size)
    problem_set = read_problems(pool)
    cfg = SamplingConfig(n=args.n, temperature=1.0, max_tokens=8, seed=0)
    engine = VLLMEngine(model)
    prompts = [{"prompt_token_ids": ids} for ids in encode_prompts(engine.tokenizer, problem_set.problems)]
    params = [
        SamplingParams(
            n=cfg.n,
            temperature=1.0,
            top_p=1.0,
            max_tokens=cfg.max_tokens,
            seed=problem_seed(cfg.seed, p.problem_id),
            logprobs=0,
        )
        for p in problem_set.problems
    ]
    engine.llm.generate(prompts[:16], params[:16], use_tqdm=False)  # warm-up

    bare, ours, tokens = [], [], 0
    for rep in range(args.repeats):
        t = time.perf_counter()
        outs = engine.llm.generate(prompts, params, use_tqdm=False)
        bare.append(time.perf_counter() - t)
        tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
        store = open_store(work / f"store{rep}")
        t = time.perf_counter()
        run_rollout_stage(store, "train", problem_set, model_path=model, model_hash="bench", cfg=cfg, engine=engine)
        ours.append(time.perf_counter() - t)

    hf = HFEngine(model)
    seeds = [problem_seed(cfg.seed, p.problem_id) for p in problem_set.problems]
    ids = [p["prompt_token_ids"] for p in prompts]
    t = time.perf_counter()
    hf_out = hf.generate(ids, seeds, cfg)
    hf_time = time.perf_counter() - t
    hf_tokens = sum(len(g.response_token_ids) for gens in hf_out for g in gens)

    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{args.size} problems x {args.n} samples, {tokens} generated tokens, model {args.model}\n")
    print("| arm | median s | tokens/s |")
    print("| --- | ---: | ---: |")
    print(f"| bare vllm.LLM.generate | {b:.2f} | {tokens / b:.0f} |")
    print(f"| gradsel rollout stage (vLLM) | {o:.2f} | {tokens / o:.0f} |")
    print(f"| gradsel hf engine (1 run) | {hf_time:.2f} | {hf_tokens / hf_time:.0f} |")
    print(f"\noverhead ratio gradsel/bare: {o / b:.3f} (target <= 1.10)")
    print(f"vLLM/hf throughput ratio: {(tokens / o) / (hf_tokens / hf_time):.2f}")


def bench_problems(data: str, size: int):
    """`size` problems: the bundled arithmetic pool, or GSM8K word problems in verl's row shape."""
    import sys

    from gradsel.inputs.problems import problem_from_row

    if data == "arith":
        work = Path(tempfile.mkdtemp(prefix="gradsel-bench-"))
        return read_problems(write_regime(work / "data", "clean", size=size)[0]).problems
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from verl_data import gsm8k_rows

    rows = gsm8k_rows([(2 + i % 7, 3 + i % 5) for i in range(size)], "train")
    return [problem_from_row(row, i) for i, row in enumerate(rows)]


def hf_only(args) -> None:
    """The transformers engine alone: median seconds to roll out `size` problems x n."""
    import gradsel

    model = resolve_model_path(args.model)
    problems = bench_problems(args.data, args.size)
    cfg = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    hf = HFEngine(model)
    prompts = encode_prompts(hf.tokenizer, problems)
    seeds = [problem_seed(cfg.seed, p.problem_id) for p in problems]
    hf.generate(prompts[:1], seeds[:1], cfg)  # warm-up
    times, cpu, tokens = [], [], 0
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        out = hf.generate(prompts, seeds, cfg)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # less sensitive than wall time to a busy machine
        tokens = sum(len(g.response_token_ids) for gens in out for g in gens)
    lengths = sorted(len(p) for p in prompts)
    median = statistics.median(times)
    print(f"gradsel from {Path(gradsel.__file__).parent}")
    print(
        f"{args.size} problems x {args.n} samples, prompts {lengths[0]}-{lengths[-1]} tokens, "
        f"max {args.max_tokens} new tokens, {tokens} generated tokens, model {args.model}"
    )
    print(
        f"hf engine: median {median:.2f} s of {args.repeats} ({', '.join(f'{t:.2f}' for t in times)}), "
        f"{args.size / median:.2f} problems/s, {tokens / median:.0f} tokens/s"
    )
    print(f"hf engine CPU time: median {statistics.median(cpu):.2f} s ({', '.join(f'{t:.2f}' for t in cpu)})")


if __name__ == "__main__":
    main()
