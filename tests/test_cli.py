import gradsel
from helpers import run_cli


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
