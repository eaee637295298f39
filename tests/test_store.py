import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from gradsel.core.errors import GradselError
from gradsel.demo.tasks import write_regime
from gradsel.store.directory import FORMAT_VERSION, Store, writer_lock
from helpers import GRADSEL, QUICK_SCORE, ROOT, assert_user_error, run_cli


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom gradsel.store.directory import writer_lock\n"
            f"with writer_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n"
            "    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GradselError) as err:
            with writer_lock(tmp_path):
                pass
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err.value.message
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(tmp_path):  # the kernel released the dead holder's lock: nothing stale to take over
        assert json.loads((tmp_path / ".lock.json").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.json").exists()


@pytest.mark.parametrize("left", [b"", b'{"pid": 1, "host": "elsewhere"}'])
def test_a_lock_file_left_behind_never_blocks(tmp_path, left):
    (tmp_path / ".lock").write_bytes(left)  # a crash between create and write; a holder long gone
    with writer_lock(tmp_path):
        with pytest.raises(GradselError, match="is locked by pid"):
            with writer_lock(tmp_path):  # and the lock is real while held
                pass


def test_other_format_versions_get_a_clear_message(tmp_path):
    for version, needle in ((FORMAT_VERSION + 1, "upgrade gradsel"), (0, "rescore")):
        (tmp_path / "manifest.json").write_text(json.dumps({"format_version": version}))
        with pytest.raises(GradselError) as err:
            Store(tmp_path).read_manifest()
        assert needle in err.value.hint


def test_a_run_that_wrote_no_shard_does_not_pin_its_inputs(tmp_path):
    pool, val = write_regime(tmp_path / "data", "clean", size=8, val_size=16, seed=2)
    (tmp_path / "judge.py").write_text("def boom(*a):\n    raise RuntimeError('judge down')\n")
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
        *QUICK_SCORE,
    ]
    proc = run_cli(*args, "--reward", "judge:boom", check=False, env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(proc, "judge down")
    proc = run_cli(*args, "--reward", "int", check=False)  # the fix the hint points to
    assert proc.returncode == 0, proc.stderr


def run_as_nobody(*args: str, home) -> subprocess.CompletedProcess:
    """The CLI as an unprivileged user: root writes through read-only permissions."""
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *GRADSEL, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture
def world_readable_tmp():
    """pytest's tmp_path sits under a directory only root can enter."""
    import tempfile

    path = tempfile.mkdtemp(prefix="gradsel-ro-")
    os.chmod(path, 0o755)
    yield __import__("pathlib").Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _nobody_can_run_gradsel() -> bool:
    """The unprivileged user must reach this checkout and its interpreter (CI's folder may not let it)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *GRADSEL, "--version"],
        capture_output=True,
        cwd="/",
        timeout=120,
    )
    return probe.returncode == 0


def test_read_only_store_selects_and_unwritable_places_are_user_errors(world_readable_tmp):
    if not _nobody_can_run_gradsel():
        pytest.skip("needs root, setpriv, and a checkout an unprivileged user can read")
    tmp_path = world_readable_tmp
    pool, val = write_regime(tmp_path / "data", "clean", size=30, val_size=16, seed=2)
    store = tmp_path / "store"  # owned by root: read-only to the user below
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        "--chunk-size",
        "15",
        *QUICK_SCORE,
    )
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    out = home / "round0.jsonl"
    proc = run_as_nobody(
        "select",
        "--store",
        str(store),
        "--top-k",
        "2",
        "--allow-fewer",
        "--format",
        "jsonl",
        "--out",
        str(out),
        home=home,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "read-only" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_as_nobody(
        "select",
        "--store",
        str(store),
        "--top-k",
        "2",
        "--allow-fewer",
        "--format",
        "jsonl",
        "--out",
        str(tmp_path / "x.jsonl"),
        home=home,
    )
    assert_user_error(proc, "permission denied")
    proc = run_as_nobody(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        *QUICK_SCORE,
        home=home,
    )
    assert_user_error(proc, "permission denied")
    proc = run_as_nobody("demo-data", "--out", str(tmp_path / "d"), "--size", "4", "--val-size", "2", home=home)
    assert_user_error(proc, "permission denied")
