"""What the tests share, imported by name (`from helpers import run_cli`): running the real CLI,
comparing stores, the CLI's error contract, and the trainers' environments. Tests never import
other test modules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gradsel.demo.tasks import verl_row

ROOT = Path(__file__).resolve().parents[1]
GRADSEL = [sys.executable, "-m", "gradsel.cli"]


def run_cli(
    *args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run the real `gradsel` CLI in a subprocess (no network, no colour)."""
    full_env = {
        **os.environ,
        "NO_COLOR": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "COLUMNS": "200",
        **(env or {}),
    }
    proc = subprocess.run(
        [*GRADSEL, *args], capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gradsel {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


# One torch thread per process, for runs whose features are compared byte for byte: parts running
# side by side (two processes spinning on two cores would crawl) and Ray's CPU tasks use one, and
# a reduction split across another thread count may round differently.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def assert_same_features(found: Path, reference: Path) -> None:
    """Two feature directories hold the same scores and byte-identical vector shards."""

    assert pq.read_table(found / "scores.parquet").equals(pq.read_table(reference / "scores.parquet"))
    for split in ("train", "val"):
        for shard in sorted((reference / split).glob("shard-*.parquet")):
            assert (found / split / shard.name).read_bytes() == shard.read_bytes(), shard


def assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith(("error:", "hint:"))]
    assert lines[0].startswith("error:") and lines[1].startswith("hint:"), proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert proc.stdout == ""


# Separate environments where verl and OpenRLHF are installed (never gradsel's own venv), made by
# `make trainer-envs` (a dependency of `make test`; docs/trainers.md), or named by these variables.
TRAINER_ENVS = ROOT / ".trainer-envs"


VERL_PYTHON = Path(os.environ.get("GRADSEL_VERL_PYTHON", TRAINER_ENVS / "verl/bin/python"))


OPENRLHF_PYTHON = Path(os.environ.get("GRADSEL_OPENRLHF_PYTHON", TRAINER_ENVS / "openrlhf/bin/python"))


def skip_unless_importable(python: Path, module: str, env: str, variable: str) -> None:
    """Skip where `module` does not import in `python`, saying why: the reason `make trainer-envs`
    recorded when its install failed, else how to make the environment."""
    if (
        python.is_file()
        and subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0
    ):
        return
    failed = TRAINER_ENVS / f"{env}.install-failed"
    why = failed.read_text().strip() if variable not in os.environ and failed.is_file() else "run `make trainer-envs`"
    pytest.skip(f"{module} is not importable by {python}: {why} (or set {variable}; docs/trainers.md)")


# Arguments that make `gradsel score` quick on the bundled model (transformers engine, short answers).
QUICK_SCORE = ["--engine", "hf", "--max-tokens", "6", "--n", "4", "--n-val", "4"]


def arith_rows(n: int, split: str, domain: str = "add1") -> list[dict]:
    return [verl_row(i % 10, "+", (3 * i) % 10, domain=domain, split=split, index=i) for i in range(n)]


def write_odd_jsonl(rows: list[dict], path):
    """JSON lines with a BOM, CRLF endings, blank lines and a line holding only a no-break space."""
    parts = []
    for i, row in enumerate(rows):
        parts.append(json.dumps(row))
        if i % 4 == 1:
            parts.append("\u00a0")
        if i % 5 == 2:
            parts.append("   ")
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(parts).encode() + b"\r\n")
    return path
