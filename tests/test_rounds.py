"""Rounds: chunks, refresh, reuse of unselected problems, resume, and the identical-checkpoint refusal."""

import json
import os
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from gradsel.core.errors import GradselError
from gradsel.demo.tasks import write_regime
from gradsel.inputs.models import resolve_model_path
from gradsel.inputs.problems import read_problems
from gradsel.pipeline.rounds import round_selection
from gradsel.store.directory import writer_lock
from helpers import GRADSEL, QUICK_SCORE, ROOT, assert_user_error, run_cli

SCORE = ["--engine", "hf", "--max-tokens", "8", "--n", "6", "--n-val", "6"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The pool, the validation set and a second checkpoint, read (never written) by every test."""
    tmp = tmp_path_factory.mktemp("rounds-data")
    pool, val = write_regime(tmp / "data", "clean", size=60, val_size=12, seed=3)
    ckpt2 = tmp / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    # A "trained" checkpoint: same weights but one byte of a different config field (a new content hash).
    cfg = json.loads((ckpt2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.1e-5
    (ckpt2 / "config.json").write_text(json.dumps(cfg))
    return pool, val, ckpt2


@pytest.fixture
def setup(tmp_path, data):
    return tmp_path, *data


@pytest.fixture(scope="module")
def round0(data, tmp_path_factory):
    """Round 0 scored on the Parquet pool in chunks of 20, made once; each test that starts from it
    takes its own copy."""
    pool, val, _ = data
    store = tmp_path_factory.mktemp("rounds-round0") / "store"
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
        "20",
        *SCORE,
    )
    return store


def manifest(store):
    """The top manifest, with each round's selection (its selection.json) filled in."""
    m = json.loads((store / "manifest.json").read_text())
    for r in m["rounds"]:
        r["selected_ids"] = round_selection(store, r)
    return m


def messy_jsonl(pool, dest, pad: int = 0):
    """The Parquet pool's rows as JSON lines the way editors and exports leave them: a UTF-8 BOM,
    CRLF line ends, blank and whitespace-only lines between rows, no newline at the end. `pad`
    bytes of an extra top-level field per row (gradsel ignores it). Returns (path, the bytes of
    each problem's line without its line end, by problem id)."""
    ids = [p.problem_id for p in read_problems(pool).problems]
    lines = [
        json.dumps({**row, **({"notes": "x" * pad} if pad else {})}).encode() for row in pq.read_table(pool).to_pylist()
    ]
    physical = []
    for i, line in enumerate(lines):
        if i in (1, 7, 30):
            physical += [b"", b"   "]  # blank lines still count as line indices for the reader
        physical.append(line)
    dest.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(physical))
    return dest, dict(zip(ids, lines))


def lines_of(line_of: dict, ids) -> bytes:
    return b"".join(line_of[pid] + b"\n" for pid in ids)


def test_rounds_cut_jsonl_chunks_from_the_pools_own_rows(setup):
    """A round's chunk and its selection hold the pool's lines for the chunk's problems, byte for
    byte, on a JSONL pool with a BOM, CRLF and blank lines (the chunk once split the file its own
    way, and cut other problems' rows)."""
    tmp, pool, val, ckpt2 = setup
    jsonl, line_of = messy_jsonl(pool, tmp / "pool.jsonl")
    store = tmp / "store"
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(jsonl),
        "--val",
        str(val),
        "--store",
        str(store),
        "--chunk-size",
        "20",
        *SCORE,
    )
    run_cli(
        "select",
        "--store",
        str(store),
        "--top-k",
        "5",
        "--allow-fewer",
        "--format",
        "jsonl",
        "--out",
        str(tmp / "r0.jsonl"),
    )
    run_cli(
        "refresh",
        "--store",
        str(store),
        "--model",
        str(ckpt2),
        "--top-k",
        "5",
        "--allow-fewer",
        "--format",
        "jsonl",
        "--out",
        str(tmp / "r1.jsonl"),
    )
    rounds = manifest(store)["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert (store / r["dir"] / "chunk.jsonl").read_bytes() == lines_of(line_of, r["chunk_ids"]), r["round"]
        assert r["selected_ids"]
        assert (tmp / f"r{r['round']}.jsonl").read_bytes() == lines_of(line_of, r["selected_ids"])


def test_refresh_selects_and_records_under_the_lock_it_scored_under(setup):
    """Between refresh's scoring and the selection it records, no other writer may take the store.
    refresh writing to a pipe a selection larger than the pipe holds waits for the reader; while
    it waits, mid-selection, a second writer must be refused."""
    tmp, pool, val, ckpt2 = setup
    # Rows of 150 KB: one selected row alone is more than twice a Linux pipe's 64 KiB.
    jsonl, line_of = messy_jsonl(pool, tmp / "pool.jsonl", pad=150_000)
    store = tmp / "store"
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(jsonl),
        "--val",
        str(val),
        "--store",
        str(store),
        "--chunk-size",
        "20",
        *SCORE,
    )
    run_cli("select", "--store", str(store), "--top-k", "3", "--allow-fewer", "--format", "ids")
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(tmp / "refresh.err", "w") as err:
        proc = subprocess.Popen(
            [
                *GRADSEL,
                "refresh",
                "--store",
                str(store),
                "--model",
                str(ckpt2),
                "--top-k",
                "3",
                "--allow-fewer",
                "--format",
                "jsonl",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            env=env,
        )
        try:
            first = proc.stdout.read(1)  # the round is scored; its selection is being written
            assert first == b"{", (tmp / "refresh.err").read_text()[-3000:]
            with pytest.raises(GradselError, match="is locked by pid"):
                with writer_lock(store):
                    pass
        finally:
            rest = proc.stdout.read()
            code = proc.wait()
    assert code == 0, (tmp / "refresh.err").read_text()[-3000:]
    selected = manifest(store)["rounds"][1]["selected_ids"]
    assert selected and first + rest == lines_of(line_of, selected)


def test_rounds_take_disjoint_chunks_and_record_history(setup, round0):
    tmp, pool, val, ckpt2 = setup
    store = tmp / "store"
    shutil.copytree(round0, store)
    run_cli(
        "select",
        "--store",
        str(store),
        "--top-k",
        "5",
        "--allow-fewer",
        "--format",
        "ids",
        "--out",
        str(tmp / "r0.txt"),
    )
    out = json.loads(
        run_cli(
            "refresh",
            "--store",
            str(store),
            "--model",
            str(ckpt2),
            "--top-k",
            "5",
            "--allow-fewer",
            "--format",
            "ids",
            "--out",
            str(tmp / "r1.txt"),
        ).stdout
    )
    assert out["round"] == 1 and out["candidates"] == 20
    rounds = manifest(store)["rounds"]
    assert [len(r["chunk_ids"]) for r in rounds] == [20, 20]
    assert not set(rounds[0]["chunk_ids"]) & set(rounds[1]["chunk_ids"])
    assert rounds[0]["checkpoint"] != rounds[1]["checkpoint"]
    assert (tmp / "r1.txt").read_text().split() == rounds[1]["selected_ids"]
    history = pq.read_table(store / "history.parquet").to_pylist()
    assert len(history) == 40 and sum(h["selected"] for h in history) == len(rounds[0]["selected_ids"]) + len(
        rounds[1]["selected_ids"]
    )
    # The chunk file holds the original rows, unchanged.
    original = {r["extra_info"]["index"]: r for r in pq.read_table(pool).to_pylist()}
    chunk = pq.read_table(store / "rounds/round-001/chunk.parquet").to_pylist()
    assert [original[r["extra_info"]["index"]] for r in chunk] == chunk
    info = json.loads(run_cli("info", "--store", str(store)).stdout)
    assert len(info["rounds"]) == 2


def test_identical_checkpoint_is_refused_and_unselected_can_return(setup):
    tmp, pool, val, _ = setup
    store = tmp / "store"
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
        "40",
        *SCORE,
    )
    run_cli("select", "--store", str(store), "--top-k", "3", "--allow-fewer", "--format", "ids")
    proc = run_cli("refresh", "--store", str(store), "--model", "tiny-arith", check=False)
    assert proc.returncode == 2 and "identical to round 0" in proc.stderr
    run_cli(
        "refresh", "--store", str(store), "--model", "tiny-arith", "--force", "--chunk-size", "40", "--reuse-unselected"
    )
    rounds = manifest(store)["rounds"]
    second = rounds[1]["chunk_ids"]
    assert len(second) == 40
    assert not set(second) & set(rounds[0]["selected_ids"])  # selected problems never come back
    assert set(second) & set(rounds[0]["chunk_ids"])  # the 20 fresh ones plus unselected ones from round 0


def test_killed_refresh_resumes(setup, round0):
    tmp, pool, val, ckpt2 = setup
    store = tmp / "store"
    shutil.copytree(round0, store)
    run_cli("select", "--store", str(store), "--top-k", "3", "--allow-fewer", "--format", "ids")
    run_cli("refresh", "--store", str(store), "--model", str(ckpt2))
    reference = pq.read_table(next((store / "rounds/round-001/features").glob("*/scores.parquet")))
    # Simulate a kill after the rollouts: the round is recorded without its checkpoint, the
    # features stage never finished.
    m = json.loads((store / "manifest.json").read_text())
    del m["rounds"][1]["checkpoint"]
    (store / "manifest.json").write_text(json.dumps(m))
    for d in (store / "rounds/round-001/features").iterdir():
        shutil.rmtree(d)
    run_cli("refresh", "--store", str(store), "--model", str(ckpt2))
    resumed = pq.read_table(next((store / "rounds/round-001/features").glob("*/scores.parquet")))
    assert resumed.equals(reference)
    rounds = manifest(store)["rounds"]
    assert len(rounds) == 2 and "checkpoint" in rounds[1]  # the resumed round is complete, as if never killed


@pytest.mark.slow
@pytest.mark.trainer
def test_trl_loop_learns_what_the_selection_teaches(tmp_path):
    """select -> TRL GRPOTrainer (gradsel's reward) -> checkpoint -> held-out accuracy, on the CPU.
    One round in the wrong-answer regime: the model trained on only the correctly labelled
    problems must end above the one trained on only the wrongly labelled ones. This fails if the
    selection, the verl rows, the reward or the trained checkpoint do not reach each other."""
    pytest.importorskip("trl")
    import subprocess
    import sys

    from helpers import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/trl_loop.py"),
            "--regimes",
            "wrong-answer",
            "--arms",
            "oracle",
            "unwanted",
            "--rounds",
            "1",
            "--steps",
            "20",
            "--lr",
            "1e-4",
            "--chunk-size",
            "100",
            "--top-k",
            "24",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {
        arm: json.loads((tmp_path / f"wrong-answer/seed0/{arm}/results.json").read_text())["rounds"]
        for arm in ("oracle", "unwanted")
    }
    assert all([r["round"] for r in rounds] == [0, 1] and rounds[1]["trained_on"] > 0 for rounds in runs.values())
    assert runs["oracle"][0] == runs["unwanted"][0]  # one round-0 store and checkpoint for both arms
    assert all(0 <= r[key] <= 1 for rounds in runs.values() for r in rounds for key in ("sampled", "greedy"))
    assert runs["oracle"][1]["sampled"] > runs["unwanted"][1]["sampled"] + 0.02, runs
    assert (tmp_path / "wrong-answer/seed0/oracle/round0/checkpoint/model.safetensors").is_file()


def _chunked_store(tmp_path):
    """A clean pool scored in chunks of 10 (round 0 made, nothing selected yet)."""
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
        *QUICK_SCORE,
    )
    return store


def _rounds_store(tmp_path):
    from gradsel.inputs.models import resolve_model_path

    store = _chunked_store(tmp_path)
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


def test_a_round_without_a_selection_names_the_select_that_helps(tmp_path):
    from gradsel.inputs.models import resolve_model_path

    store = _chunked_store(tmp_path)
    ckpt2 = tmp_path / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    (ckpt2 / "generation_config.json").write_text("{}")  # a new content hash
    proc = run_cli(
        "refresh", "--store", str(store), "--model", str(ckpt2), "--top-k", "2", "--format", "ids", check=False
    )
    assert_user_error(proc, "round 0 has no selection yet")
    assert f"gradsel select --store {store}" in proc.stderr and "within refresh" not in proc.stderr
