"""The GPU paths in one run (benchmarks/gpu_check.sh): CUDA projection in float32 and bfloat16
against the CPU's, official vLLM's rollouts, faiss-gpu against faiss-cpu's answers.

    python -m benchmarks.gpu_check --out DIR

Prints one line per check and writes DIR/gpu_check.json. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def gradsel(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gradsel.cli", "-q", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"gradsel {' '.join(args)}:\n{out.stderr[-3000:]}")
    return out.stdout


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def train_cos(store: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    features = json.loads((store / "manifest.json").read_text())["features"]
    rows = pq.read_table(store / features / "scores.parquet").to_pylist()
    return {r["problem_id"]: r["score_cos"] for r in rows if r["split"] == "train" and not r["zero_advantage"]}


def check_projection(work: Path) -> dict:
    """The same rollouts (the transformers engine, on the CPU) scored on the CPU and on CUDA."""
    from gradsel.demo.tasks import write_regime

    write_regime(work / "data", "noisy", size=200, val_size=40, seed=0)
    common = [
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(work / "data/pool.parquet"),
        "--val",
        str(work / "data/val.parquet"),
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        "--alignment",
        "lowrank",
    ]
    out = {}
    for name, extra in (
        ("cpu", ["--device", "cpu"]),
        ("cuda", ["--device", "cuda"]),
        ("cuda-bf16", ["--device", "cuda", "--dtype", "bfloat16"]),
    ):
        store = work / f"store-{name}"
        if name != "cpu":  # the CPU store's rollouts, reused: only the gradients are computed again
            shutil.copytree(work / "store-cpu", store, ignore=shutil.ignore_patterns("features"))
        t = time.perf_counter()
        gradsel(*common, "--store", str(store), *extra)
        out[name] = {"seconds": time.perf_counter() - t, "cos": train_cos(store)}
    ids = sorted(out["cpu"]["cos"])
    ref = [out["cpu"]["cos"][i] for i in ids]
    return {
        "cuda_vs_cpu_spearman": spearman([out["cuda"]["cos"][i] for i in ids], ref),
        "bf16_vs_cpu_spearman": spearman([out["cuda-bf16"]["cos"][i] for i in ids], ref),
        "seconds": {k: round(v["seconds"], 1) for k, v in out.items()},
    }


def check_vllm(work: Path) -> dict:
    import vllm

    t = time.perf_counter()
    result = json.loads(gradsel("demo", "--out", str(work / "demo"), "--engine", "vllm"))
    return {
        "vllm": vllm.__version__,
        "seconds": round(time.perf_counter() - t, 1),
        "reliable_corrupted_share": result["modes"]["reliable"]["corrupted_share"],
        "spearman": result["projected_vs_exact_spearman"],
    }


def check_faiss() -> dict:
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 512), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:64]
    cpu = faiss.IndexFlatIP(512)
    cpu.add(x)
    _, want = cpu.search(q, 10)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    t = time.perf_counter()
    _, got = gpu.search(q, 10)
    return {
        "gpus": faiss.get_num_gpus(),
        "top10_agreement": float((got == want).mean()),
        "search_s": round(time.perf_counter() - t, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gradsel-gpu-check"))
    args = ap.parse_args()
    import torch

    results: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    failed = False
    for name, check, ok in (
        (
            "projection",
            lambda: check_projection(args.out / "projection"),
            lambda r: r["cuda_vs_cpu_spearman"] >= 0.99 and r["bf16_vs_cpu_spearman"] >= 0.9,
        ),
        ("vllm", lambda: check_vllm(args.out), lambda r: r["reliable_corrupted_share"] <= 0.5),
        ("faiss", check_faiss, lambda r: r["gpus"] >= 1 and r["top10_agreement"] >= 0.99),
    ):
        try:
            results[name] = check()
            passed = ok(results[name])
        except Exception as exc:  # report every check, then fail
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
            passed = False
        failed |= not passed
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {json.dumps(results[name])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
