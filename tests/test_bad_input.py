"""The bad-input catalogue on the command line: each case exits 2 with `error:` and `hint:`, no
traceback, nothing on stdout, no partial output file, and nothing already written lost.
(Reader-level cases, line numbers included, are in test_problems.py and test_rewards.py.)"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from gradsel.demo.tasks import write_regime
from gradsel.inputs.models import resolve_model_path
from helpers import GRADSEL, QUICK_SCORE, ROOT, arith_rows, assert_user_error, run_cli
from verl_data import write_parquet

SCORE = ["--engine", "hf", "--max-tokens", "8", "--n", "4", "--n-val", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    pool, val = write_regime(d / "data", "clean", size=12, val_size=16, seed=2)
    return d, pool, val


def _model_copy(tmp, drop=(), template=True):
    m = tmp / "model"
    shutil.copytree(resolve_model_path("tiny-arith"), m)
    for name in drop:
        (m / name).unlink()
    if not template:
        (m / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    return m


def test_tokenizer_without_a_chat_template(data, tmp_path):
    _, pool, val = data
    model = _model_copy(tmp_path, template=False)
    proc = run_cli(
        "score",
        "--model",
        str(model),
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp_path / "s"),
        *SCORE,
        check=False,
    )
    assert_user_error(proc, "no chat template")


def test_missing_tokenizer_and_missing_weights(data, tmp_path):
    _, pool, val = data
    model = _model_copy(tmp_path, drop=("tokenizer.json", "tokenizer_config.json"))
    proc = run_cli(
        "rollout",
        "--model",
        str(model),
        "--problems",
        str(pool),
        "--store",
        str(tmp_path / "s"),
        "--engine",
        "hf",
        "--n",
        "2",
        "--max-tokens",
        "4",
        check=False,
    )
    assert_user_error(proc, "tokenizer")
    proc = run_cli(
        "score",
        "--model",
        str(tmp_path / "nowhere"),
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp_path / "s2"),
        *SCORE,
        check=False,
    )
    assert_user_error(proc, "nowhere")


def test_no_problem_with_a_grpo_signal_and_k_larger_than_the_pool(data, tmp_path):
    d, pool, val = data
    store = tmp_path / "s"
    run_cli("score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store), *SCORE)
    out = tmp_path / "picked.parquet"
    proc = run_cli("select", "--store", str(store), "--top-k", "1000", "--out", str(out), check=False)
    assert_user_error(proc, "only")
    assert not out.exists()
    # Every candidate's rewards equal (a plugin that pays 1 on the pool, the real check on the
    # validation set): no candidate carries a GRPO signal, and select says so instead of an empty file.
    plugin = tmp_path / "pool_constant.py"
    plugin.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    if (extra_info or {}).get('split') == 'train':\n        return 1.0\n"
        "    import re\n    found = re.findall(r'-?\\d+', solution_str)\n"
        "    return float(bool(found) and found[-1] == str(ground_truth).strip())\n"
    )
    flat = tmp_path / "flat"
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(flat),
        "--reward",
        "pool_constant:compute_score",
        *SCORE,
        env={"PYTHONPATH": str(tmp_path)},
    )
    proc = run_cli("select", "--store", str(flat), "--top-k", "3", "--out", str(out), check=False)
    assert_user_error(proc, "every problem has zero advantage")
    assert not out.exists()


def test_out_of_space_keeps_a_valid_store_that_resumes(data, tmp_path):
    """Writes beyond 48 KiB a file fail (RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write gets
    EFBIG), as on a full disk; the store keeps only whole files and the rerun finishes it."""
    _, pool, val = data
    args = ["score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), *SCORE]
    run_cli(*args, "--store", str(tmp_path / "ref"))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, resource.RLIM_INFINITY))

    store = tmp_path / "s"
    proc = subprocess.run(
        [*GRADSEL, *args, "--store", str(store)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limit,
        env={
            "NO_COLOR": "1",
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            # a bytecode cache truncated at the limit would break later runs
            "PYTHONDONTWRITEBYTECODE": "1",
        },
    )
    assert_user_error(proc, "no space left")
    assert not list(store.rglob(".*.tmp-*")), "a temporary file was left behind"
    for marker in store.rglob("shard-*.done.json"):  # every finished shard is whole
        assert (
            pq.read_table(marker.with_name(marker.name.replace(".done.json", ".parquet"))).num_rows
            == json.loads(marker.read_text())["rows"]
        )
    run_cli(*args, "--store", str(store))
    ref_scores = next((tmp_path / "ref/features").glob("*/scores.parquet"))
    assert pq.read_table(next((store / "features").glob("*/scores.parquet"))).equals(pq.read_table(ref_scores))


@pytest.mark.parametrize(
    "flag,value,needle",
    [("--dtype", "float64", "--dtype"), ("--device", "tpu", "--device"), ("--modules", "[", "--modules")],
)
def test_bad_score_options_fail_before_any_work(tmp_path, flag, value, needle):
    pool = write_parquet(arith_rows(4, "train"), tmp_path / "pool.parquet")
    store = tmp_path / "store"
    proc = run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(pool),
        "--store",
        str(store),
        *QUICK_SCORE,
        flag,
        value,
        check=False,
    )
    assert_user_error(proc, needle)
    assert not (store / "rollouts").exists()
