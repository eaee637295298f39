"""A data source whose judge never pays is named, not silently dropped (issue 26, item 4).

tiny-arith answers `a+b=` with the bare number. Rows routed to verl's GSM8K rule (data source
`openai/gsm8k`) are paid only for `#### N`, so none of its rollouts is paid: a real never-paid
source, beside arithmetic rows the same model is paid on."""

import json

import pytest

from gradsel.rewards.registry import REGISTRY
from helpers import run_cli
from verl_data import gsm8k_routed_arith, write_parquet

GSM8K_WARNING = "no rollout of data source 'openai/gsm8k' was paid by reward gsm8k"


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """10 gsm8k-routed problems and 10 arithmetic ones (routed to the `int` judge); 8 for validation."""
    from gradsel.demo.tasks import make_regime

    out = tmp_path_factory.mktemp("mixed")
    arith, val = make_regime("clean", size=10, val_size=8, seed=3)
    pairs = [(10 + 7 * i, 20 + 3 * i) for i in range(10)]
    pool = write_parquet(gsm8k_routed_arith(pairs, "train", start=10) + arith, out / "pool.parquet")
    return pool, write_parquet(val, out / "val.parquet")


@pytest.fixture(scope="module")
def scored(mixed_data, tmp_path_factory):
    pool, val = mixed_data
    store = tmp_path_factory.mktemp("store") / "s"
    proc = run_cli(
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
        "4",
        "--n-val",
        "8",
        "--max-tokens",
        "6",
    )
    return store, proc


def test_every_reward_declares_the_answer_form_it_reads():
    assert REGISTRY["gsm8k"].answer_form.startswith("#### N")
    assert REGISTRY["math"].answer_form.startswith("\\boxed{")
    assert all(r.answer_form.strip() for r in REGISTRY.values())


def test_score_warns_of_a_never_paid_source_and_records_it(scored):
    store, proc = scored
    lines = [line for line in proc.stderr.splitlines() if GSM8K_WARNING in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("warning: rollouts/train: ") and "(0 of 40 rollouts, 10 problems)" in line
    assert "gsm8k reads #### N" in line and "Sample responses: " in line
    assert "arith/" not in proc.stderr  # the arithmetic source is paid on some rollouts: no warning

    runs = json.loads((store / "manifest.json").read_text())["rollouts"]
    assert runs["val"]["warnings"] == []  # arithmetic sources of 8 problems or fewer, each paid sometimes
    [record] = runs["train"]["warnings"]
    assert record["data_source"] == "openai/gsm8k" and record["reward"] == "gsm8k" and record["paid"] == 0
    assert record["problems"] == 10 and record["rollouts"] == 40
    assert record["answer_form"] == REGISTRY["gsm8k"].answer_form
    assert len(record["samples"]) == 2 and all(0 < len(s) <= 120 and "####" not in s for s in record["samples"])
    assert record["message"] == line.removeprefix("warning: ")

    again = run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        runs["train"]["problems_file"],
        "--val",
        runs["val"]["problems_file"],
        "--store",
        str(store),
        "--engine",
        "hf",
        "--n",
        "4",
        "--n-val",
        "8",
        "--max-tokens",
        "6",
    )
    assert "rollouts/train: complete, reused" in again.stderr and GSM8K_WARNING in again.stderr


def test_info_and_report_show_the_warning(scored, tmp_path):
    store, _ = scored
    proc = run_cli("info", "--store", str(store))
    [message] = json.loads(proc.stdout)["warnings"]
    assert GSM8K_WARNING in message
    assert "warning" in proc.stderr and GSM8K_WARNING in proc.stderr

    out = tmp_path / "report.html"
    run_cli("report", "--store", str(store), "--out", str(out))
    page = out.read_text()
    assert "<h2>Warnings</h2>" in page and GSM8K_WARNING.replace("'", "&#x27;") in page


def test_check_sample_prints_pass_rates_and_the_warning(mixed_data):
    pool, _ = mixed_data
    proc = run_cli(
        "check",
        "--pool",
        str(pool),
        "--model",
        "tiny-arith",
        "--sample",
        "8",
        "--n",
        "4",
        "--engine",
        "hf",
        "--max-tokens",
        "6",
    )
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    sample = {s["data_source"]: s for s in report["files"][0]["sample"]}
    gsm8k = sample["openai/gsm8k"]
    assert (gsm8k["reward"], gsm8k["problems"], gsm8k["rollouts"], gsm8k["paid"]) == ("gsm8k", 8, 32, 0)
    assert gsm8k["warning"].startswith("check --sample 8 (train): " + GSM8K_WARNING)
    assert all(s["reward"] == "int" and s["problems"] <= 8 for name, s in sample.items() if name != "openai/gsm8k")
    assert sum(s["paid"] for name, s in sample.items() if name != "openai/gsm8k") > 0
    assert "pass rate" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: " + gsm8k["warning"]
    ]
    # Without --sample, check rolls nothing out, as before.
    assert "sample" not in json.loads(run_cli("check", "--pool", str(pool)).stdout)["files"][0]


def test_check_sample_needs_a_model(mixed_data):
    proc = run_cli("check", "--pool", str(mixed_data[0]), "--sample", "4", check=False)
    assert proc.returncode == 2 and "error: --sample" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_finding_reused_in_one_process_is_said_once(capfd):
    """The demo and refresh pass a rollout stage several times in one process: its recorded
    warnings are said once, not at every reuse."""
    from gradsel.core import console

    console.warn("rollouts/train: a finding")
    console.warn_once("rollouts/train: a finding")
    console.warn_once("rollouts/val: another")
    console.warn_once("rollouts/val: another")
    err = capfd.readouterr().err
    assert err.count("a finding") == 1 and err.count("another") == 1
