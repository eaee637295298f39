"""Selection at scale: a store of synthetic unit vectors, then `select` on the CPU.

    .venv/bin/python -m benchmarks.selection [--n 1000000] [--dim 2048] [--index auto] [--dir DIR] [--arms ...]

Writes a store of N float16 vectors (N x dim x 2 bytes; 4 GB at the defaults), 64 validation
vectors and a scores table, then runs `gradsel select --ratio 0.05` in a fresh process per arm,
timing it and reading the process's peak RSS (/usr/bin/time):
  default              reliable --target subspace: one streaming pass over the vectors, no index
  gradalign --target mean  cosines from the scores table, no vectors read
  learnalign, first    builds the candidate FAISS index (--index) and saves it in the store
  learnalign, second   loads the saved index
  --target max         every candidate's best cosine with any of the 64 validation problems
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def build_store(root: Path, n: int, dim: int, shard: int = 65536) -> None:
    from gradsel.core.fsutil import atomic_write_json, atomic_write_table
    from gradsel.core.schema import PROBLEMS, SCORES, vectors_table
    from gradsel.store.directory import FORMAT_VERSION, write_shard

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    features = root / "features/bench"
    ids = [str(i) for i in range(n)]
    pool = root / "pool.jsonl"
    with open(pool, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"input": f"{i}+1=", "label": str(i + 1), "extra_info": {"index": i}}) + "\n")
    import hashlib

    atomic_write_table(
        root / "rollouts/train/problems.parquet",
        pa.table(
            {
                "problem_id": ids,
                "source_row": np.arange(n),
                "data_source": ["bench"] * n,
                "reward_style": [""] * n,
                "ground_truth": [str(i + 1) for i in range(n)],
                "prompt_messages_json": ['"x"'] * n,
                "extra_info_json": ["{}"] * n,
            },
            schema=PROBLEMS,
        ),
    )
    cos = rng.uniform(-1, 1, n)
    pass_rate = rng.integers(1, 8, n) / 8
    atomic_write_table(
        features / "scores.parquet",
        pa.table(
            {
                "problem_id": ids,
                "split": ["train"] * n,
                "data_source": ["bench"] * n,
                "n_rollouts": np.full(n, 8, np.int32),
                "pass_rate": pass_rate,
                "reward_mean": pass_rate,
                "reward_std": np.full(n, 0.5),
                "zero_advantage": np.zeros(n, bool),
                "grad_norm": np.ones(n),
                "score_cos": cos,
                "score_dot": cos,
                "judge_consistency": np.ones(n),
            },
            schema=SCORES,
        ),
    )
    for s, start in enumerate(range(0, n, shard)):
        m = min(shard, n - start)
        v = rng.standard_normal((m, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        write_shard(features / "train", s, vectors_table(ids[start : start + m], v, np.ones(m)))
    val = rng.standard_normal((64, dim), dtype=np.float32)
    val /= np.linalg.norm(val, axis=1, keepdims=True)
    write_shard(features / "val", 0, vectors_table([f"v{i}" for i in range(64)], val, np.ones(64)))
    # dim / 256 modules of 16 x 16 sketches, as a real store of that width would hold.
    n_modules = dim // 256 if dim % 256 == 0 else 1
    spec = {
        "feature": "projected",
        "seed": 0,
        "k_out": 16,
        "k_in": 16,
        "blocks": 1,
        "modules": [f"bench.{i}" for i in range(n_modules)],
        "dims": [[dim // n_modules, 1]] * n_modules,
        "dtype": "float32",
        "kind": "rademacher",
    }
    atomic_write_json(features / "spec.json", {"projector": spec})
    atomic_write_json(
        root / "manifest.json",
        {
            "format_version": FORMAT_VERSION,
            "projector": spec,
            "features": "features/bench",
            "rollouts": {
                "train": {
                    "problems_file": str(pool),
                    "problems_sha256": hashlib.sha256(pool.read_bytes()).hexdigest(),
                    "sampling": {"n": 8},
                    "engine": "bench",
                }
            },
        },
    )


ARMS = {
    "default": ("default (reliable --target subspace)", "only", []),
    "mean": ("gradalign --target mean", "only", ["--mode", "gradalign", "--target", "mean"]),
    "learnalign": ("learnalign", "first (builds the index)", ["--mode", "learnalign"]),
    "learnalign-again": ("learnalign", "second (saved index)", ["--mode", "learnalign"]),
    "max": ("reliable --target max", "saved index", ["--target", "max"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--index", default="auto", help="gradsel select --index for the vector arms")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which arms to run")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="gradsel-select-bench-"))
    t = time.perf_counter()
    if (root / "manifest.json").is_file():  # reuse a store an earlier run built in --dir
        print(f"store: reusing {root}\n")
    else:
        build_store(root, args.n, args.dim)
        print(
            f"store: {args.n} x {args.dim} float16 vectors ({args.n * args.dim * 2 / 2**30:.2f} GiB) built in "
            f"{time.perf_counter() - t:.0f}s at {root}\n"
        )
    print(f"--index {args.index}\n")
    print("| mode | run | wall s | peak RSS GiB | RSS / vector bytes |")
    print("| --- | --- | ---: | ---: | ---: |")
    vector_bytes = args.n * args.dim * 2
    shutil.rmtree(root / "features/bench/index", ignore_errors=True)  # the first vector run builds it
    for name, run, extra in (ARMS[a] for a in args.arms):
        t = time.perf_counter()
        proc = subprocess.run(
            [
                "/usr/bin/time",
                "-f",
                "%M",
                sys.executable,
                "-m",
                "gradsel.cli",
                "-q",
                "select",
                "--store",
                str(root),
                "--ratio",
                "0.05",
                "--index",
                args.index,
                *extra,
                "--format",
                "ids",
                "--out",
                str(root / "out.txt"),
                "--force",
            ],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr[-2000:])
            raise SystemExit(1)
        peak_kib = int(proc.stderr.strip().splitlines()[-1])
        print(f"| {name} | {run} | {wall:.1f} | {peak_kib / 2**20:.2f} | {peak_kib * 1024 / vector_bytes:.2f} |")


if __name__ == "__main__":
    main()
