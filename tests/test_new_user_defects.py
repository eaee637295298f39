"""Defects a new user hit with verl-shaped data and ordinary mistakes (issue: step 9). Each test
failed before its fix; each refusal keeps the contract of test_bad_input.py: exit 2, `error:` and
`hint:`, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from gradsel.demo.tasks import verl_row, write_regime
from gradsel.inputs.problems import read_problems
from helpers import GRADSEL, ROOT, assert_user_error, run_cli
from verl_data import gsm8k_rows, math_rows, write_parquet

SCORE = ["--engine", "hf", "--max-tokens", "6", "--n", "4", "--n-val", "4"]


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


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A pool in odd JSONL and a validation Parquet whose extra_info.index both count from 0, as
    verl's train and test files do; scored once."""
    d = tmp_path_factory.mktemp("defects")
    pool_parquet, val_parquet = write_regime(d / "data", "clean", size=30, val_size=16, seed=2)
    val_rows = pq.read_table(val_parquet).to_pylist()
    for j, row in enumerate(val_rows):  # numbered from 0, like the pool: the ids collide across splits
        row["extra_info"]["index"] = j
    val = write_parquet(val_rows, d / "val.parquet")
    pool_rows = pq.read_table(pool_parquet).to_pylist()
    pool_rows[5]["extra_info"]["index"] = str(pool_rows[5]["extra_info"]["index"])  # a string among ints
    pool = write_odd_jsonl(pool_rows, d / "pool.jsonl")
    store = d / "store"
    run_cli("score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store), *SCORE)
    return d, pool, val, store


# -- 1. ids ---------------------------------------------------------------------------------------


def test_ids_are_unique_per_data_source_and_stable(tmp_path):
    rows = gsm8k_rows([(2, 3), (4, 1)], "train") + math_rows("train")  # both number from 0
    path = write_parquet(rows, tmp_path / "train.parquet")
    ids = [p.problem_id for p in read_problems(path).problems]
    assert ids == ["openai/gsm8k:0", "openai/gsm8k:1", *(f"DigitalLearningGmbH/MATH-lighteval:{i}" for i in range(4))]
    assert ids == [p.problem_id for p in read_problems(path).problems]


def test_pool_and_validation_ids_stay_apart(scored):
    _, pool, val, store = scored
    features = json.loads((store / "manifest.json").read_text())["features"]
    rows = pq.read_table(store / features / "scores.parquet").to_pylist()
    for split, path in (("train", pool), ("val", val)):
        truth = {p.problem_id: p.data_source for p in read_problems(path).problems}
        scored_sources = {r["problem_id"]: r["data_source"] for r in rows if r["split"] == split}
        assert scored_sources == truth


# -- 2. JSONL lines -------------------------------------------------------------------------------


def test_jsonl_rows_emitted_are_the_rows_selected(scored):
    _, pool, _, store = scored
    ids = run_cli("select", "--store", str(store), "--all", "--format", "ids", "--out", "-").stdout.split()
    emitted = run_cli("select", "--store", str(store), "--all", "--format", "jsonl", "--out", "-").stdout
    got = [f"{r['data_source']}:{r['extra_info']['index']}" for r in map(json.loads, emitted.splitlines())]
    assert got == ids and len(ids) > 0


# -- 3. --balance on a missing column ---------------------------------------------------------------


def test_balance_on_a_missing_column_is_refused(scored):
    _, _, _, store = scored
    proc = run_cli(
        "select", "--store", str(store), "--top-k", "2", "--balance", "ability", "--format", "ids", check=False
    )
    assert_user_error(proc, "data_source")


# -- 4. a JSONL field of mixed types ----------------------------------------------------------------


def test_mixed_type_jsonl_field_to_parquet_is_refused_not_a_traceback(scored, tmp_path):
    _, _, _, store = scored
    out = tmp_path / "sel.parquet"
    proc = run_cli(
        "select",
        "--store",
        str(store),
        "--all",
        "--include-zero-advantage",
        "--format",
        "verl",
        "--out",
        str(out),
        check=False,
    )
    assert_user_error(proc, "extra_info")
    assert "--format jsonl" in proc.stderr and not out.exists()


# -- 5. a failed first run does not pin the store -----------------------------------------------


def test_a_run_that_wrote_no_shard_does_not_pin_its_inputs(tmp_path):
    pool, val = write_regime(tmp_path / "data", "clean", size=8, val_size=16, seed=2)
    (tmp_path / "judge.py").write_text("def boom(*a):\n    raise RuntimeError('judge down')\n")
    store = tmp_path / "store"
    args = ["score", "--model", "tiny-arith", "--pool", str(pool), "--val", str(val), "--store", str(store), *SCORE]
    proc = run_cli(*args, "--reward", "judge:boom", check=False, env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(proc, "judge down")
    proc = run_cli(*args, "--reward", "int", check=False)  # the fix the hint points to
    assert proc.returncode == 0, proc.stderr


# -- 12. unwritable places, 14. --out a directory ---------------------------------------------------


def test_out_that_is_a_directory(scored, tmp_path):
    _, _, _, store = scored
    proc = run_cli(
        "select",
        "--store",
        str(store),
        "--top-k",
        "2",
        "--format",
        "ids",
        "--out",
        str(tmp_path),
        "--force",
        check=False,
    )
    assert_user_error(proc, "is a directory")


# -- 13. bad score options before any work --------------------------------------------------------


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
        *SCORE,
        flag,
        value,
        check=False,
    )
    assert_user_error(proc, needle)
    assert not (store / "rollouts").exists()


# -- 15. bare gradsel ---------------------------------------------------------------------------------


def test_bare_gradsel_prints_help_and_exits_0():
    proc = run_cli(check=False)
    assert proc.returncode == 0 and "score" in proc.stdout and "error" not in proc.stderr


# -- 17. a closed pipe ----------------------------------------------------------------------------------


def test_a_closed_pipe_is_not_an_error(scored):
    _, _, _, store = scored
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        " ".join([*GRADSEL, "select", "--store", str(store), "--all", "--format", "jsonl", "--out", "-"])
        + " | head -c 1 > /dev/null; echo ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout.strip() == "0", proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr


# -- 12. unwritable stores and outputs --------------------------------------------------------------


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
        *SCORE,
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
        *SCORE,
        home=home,
    )
    assert_user_error(proc, "permission denied")
    proc = run_as_nobody("demo-data", "--out", str(tmp_path / "d"), "--size", "4", "--val-size", "2", home=home)
    assert_user_error(proc, "permission denied")


# -- 6, 18. refresh: an incomplete round, another vocabulary ------------------------------------------


def _rounds_store(tmp_path):
    from gradsel.inputs.models import resolve_model_path

    pool, val = write_regime(tmp_path / "data", "clean", size=30, val_size=16, seed=2)
    store = tmp_path / "store"
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
        "10",
        *SCORE,
    )
    run_cli("select", "--store", str(store), "--top-k", "3", "--allow-fewer", "--format", "ids")
    ckpt2 = tmp_path / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    cfg = json.loads((ckpt2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.1e-5  # a "trained" checkpoint: a new content hash
    (ckpt2 / "config.json").write_text(json.dumps(cfg))
    return store, ckpt2


def test_an_incomplete_round_is_finished_or_restarted_never_silently_rescored(tmp_path):
    store, ckpt2 = _rounds_store(tmp_path)
    m = json.loads((store / "manifest.json").read_text())
    # A refresh that died in round 1, started with a checkpoint since found broken.
    m["rounds"].append(
        {"round": 1, "dir": "rounds/round-001", "chunk_ids": m["pool_order"][10:20], "model": str(ckpt2)}
    )
    (store / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("refresh", "--store", str(store), "--model", "tiny-arith", check=False)
    assert_user_error(proc, f"it was started with {ckpt2}")
    assert "--restart-round" in proc.stderr
    run_cli("refresh", "--store", str(store), "--model", "tiny-arith", "--restart-round", "--force")
    m = json.loads((store / "manifest.json").read_text())
    assert [r["round"] for r in m["rounds"]] == [0, 1]
    assert m["rounds"][1]["model"] == "tiny-arith" and m["rounds"][1]["chunk_ids"] == m["pool_order"][10:20]
    assert "checkpoint" in m["rounds"][1]
    proc = run_cli("refresh", "--store", str(store), "--model", str(ckpt2), "--restart-round", check=False)
    assert_user_error(proc, "nothing to restart")


def test_refresh_refuses_a_checkpoint_with_another_vocabulary(tmp_path):
    store, ckpt2 = _rounds_store(tmp_path)
    tok = json.loads((ckpt2 / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    (a, ia), (b, ib) = list(vocab.items())[-2:]
    vocab[a], vocab[b] = ib, ia  # two tokens swap ids
    (ckpt2 / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_cli("refresh", "--store", str(store), "--model", str(ckpt2), check=False)
    assert_user_error(proc, "different vocabulary")
    assert len(json.loads((store / "manifest.json").read_text())["rounds"]) == 1


# -- 10. LoRA adapters without a tokenizer ------------------------------------------------------------


@pytest.fixture
def lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from gradsel.inputs.models import resolve_model_path

    base_dir = resolve_model_path("tiny-arith")
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    lora.save_pretrained(tmp_path / "adapter")  # PEFT saves no tokenizer
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(cfg))
    assert not (tmp_path / "adapter/tokenizer.json").exists()
    return tmp_path / "adapter"


def test_a_lora_adapter_scores_with_its_base_tokenizer_merged_once(lora_adapter, tmp_path):
    pool, val = write_regime(tmp_path / "data", "clean", size=10, val_size=16, seed=2)
    store = tmp_path / "store"
    run_cli(
        "score", "--model", str(lora_adapter), "--pool", str(pool), "--val", str(val), "--store", str(store), *SCORE
    )
    merged = list((store / "merged").iterdir())
    assert len(merged) == 1 and (merged[0] / "tokenizer.json").is_file() and (merged[0] / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_lora_adapter_rolls_out_through_vllm(lora_adapter, tmp_path):
    pool, val = write_regime(tmp_path / "data", "clean", size=10, val_size=16, seed=2)
    summary = json.loads(
        run_cli(
            "score",
            "--model",
            str(lora_adapter),
            "--pool",
            str(pool),
            "--val",
            str(val),
            "--store",
            str(tmp_path / "store"),
            "--engine",
            "vllm",
            "--max-tokens",
            "6",
            "--n",
            "4",
        ).stdout
    )
    assert summary["candidates"] == 10


# -- 11. a checkpoint still being written ---------------------------------------------------------------


def test_a_truncated_safetensors_file_is_a_user_error(tmp_path):
    from gradsel.inputs.models import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny-arith"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    pool, val = write_regime(tmp_path / "data", "clean", size=4, val_size=4, seed=2)
    proc = run_cli(
        "score",
        "--model",
        str(model),
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp_path / "store"),
        *SCORE,
        check=False,
    )
    assert_user_error(proc, "is incomplete or damaged")


# -- 16. Ctrl-C ------------------------------------------------------------------------------------------


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


# -- 7. the hint for a round without a selection -----------------------------------------------------


def test_a_round_without_a_selection_names_the_select_that_helps(tmp_path):
    from gradsel.inputs.models import resolve_model_path

    pool, val = write_regime(tmp_path / "data", "clean", size=30, val_size=16, seed=2)
    store = tmp_path / "store"
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
        "10",
        *SCORE,
    )
    ckpt2 = tmp_path / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    (ckpt2 / "generation_config.json").write_text("{}")  # a new content hash
    proc = run_cli(
        "refresh", "--store", str(store), "--model", str(ckpt2), "--top-k", "2", "--format", "ids", check=False
    )
    assert_user_error(proc, "round 0 has no selection yet")
    assert f"gradsel select --store {store}" in proc.stderr and "within refresh" not in proc.stderr


# -- 19. the reward used, per data source ---------------------------------------------------------------


def test_info_shows_the_reward_used_per_data_source(scored):
    _, pool, _, store = scored
    info = json.loads(run_cli("info", "--store", str(store)).stdout)
    sources = [p.data_source for p in read_problems(pool).problems]
    assert info["rollouts"]["train"]["rewards"] == {s: {"int": sources.count(s)} for s in set(sources)}
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["rollouts"]["train"]["reward"] is None  # no --reward: chosen per row, recorded per source
