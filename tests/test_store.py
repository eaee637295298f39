import json
import socket
import subprocess
import sys

import pytest

from gradsel.errors import GradselError
from gradsel.store import FORMAT_VERSION, Store, writer_lock


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    with writer_lock(tmp_path):
        with pytest.raises(GradselError) as err:
            with writer_lock(tmp_path):
                pass
        assert f"on host {socket.gethostname()}" in err.value.message and "pid" in err.value.message
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with writer_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] != int(dead.stdout)


def test_other_format_versions_get_a_clear_message(tmp_path):
    for version, needle in ((FORMAT_VERSION + 1, "upgrade gradsel"), (0, "rescore")):
        (tmp_path / "manifest.json").write_text(json.dumps({"format_version": version}))
        with pytest.raises(GradselError) as err:
            Store(tmp_path).read_manifest()
        assert needle in err.value.hint
