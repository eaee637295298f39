import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADSEL = [sys.executable, "-m", "gradsel.cli"]


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real `gradsel` CLI in a subprocess (no network, no colour)."""
    full_env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([*GRADSEL, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gradsel {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def noisy_data(tmp_path_factory) -> Path:
    from gradsel.tasks import write_regime

    out = tmp_path_factory.mktemp("noisy")
    write_regime(out, "noisy", size=60, val_size=12, seed=0)
    return out
