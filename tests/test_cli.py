import json
import os
import subprocess

import gradsel
from gradsel.demo.tasks import write_regime
from helpers import GRADSEL, ROOT, run_cli


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"gradsel {gradsel.__version__}"
    help_text = run_cli("--help").stdout
    for command in ("demo", "demo-data"):
        assert command in help_text
    assert "--quiet" in help_text and "--verbose" in help_text


def test_usage_errors_exit_2_with_hint_and_no_traceback():
    for args in (
        ["no-such-command"],
        ["demo-data"],
        ["demo-data", "--out", "x", "--regime", "bogus"],
        ["--quiet", "--verbose", "demo-data", "--out", "x"],
    ):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and lines[-1].startswith("hint: "), proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_missing_model_is_a_user_error(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path), "--model", str(tmp_path / "nope"), "--engine", "hf", check=False)
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr and "hint:" in proc.stderr


def test_no_color_means_no_escape_codes(tmp_path):
    proc = run_cli(
        "demo-data", "--out", str(tmp_path), "--size", "5", "--val-size", "2", env={"NO_COLOR": "1", "FORCE_COLOR": "1"}
    )
    assert "\x1b[" not in proc.stderr
    assert proc.stdout == ""  # logs go to stderr; stdout is for data only


def test_bare_gradsel_prints_help_and_exits_0():
    proc = run_cli(check=False)
    assert proc.returncode == 0 and "score" in proc.stdout and "error" not in proc.stderr


def test_an_interrupt_says_what_was_kept_even_when_started_in_the_background(tmp_path):
    import signal
    import time

    pool, val = write_regime(tmp_path / "data", "clean", size=400, val_size=16, seed=2)
    store = tmp_path / "store"
    args = [
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        "--engine",
        "hf",
        "--n",
        "8",
        "--shard-size",
        "16",
    ]
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    # As `gradsel score ... &` in a script: the shell starts it with SIGINT ignored.
    proc = subprocess.Popen(
        [*GRADSEL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    marker = store / "rollouts" / "train" / "shard-00000.done.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "interrupted: every finished shard is kept" in err and "Traceback" not in err
    assert json.loads(run_cli(*args).stdout)["candidates"] == 400  # the rerun resumes and finishes
