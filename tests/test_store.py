import json
import os
import socket
import subprocess
import sys

import pytest

from gradsel.core.errors import GradselError
from gradsel.store.directory import FORMAT_VERSION, Store, writer_lock


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
