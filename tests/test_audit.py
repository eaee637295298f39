"""`gradsel audit`: the real CLI on real tiny-arith stores with planted wrong keys (the model's own
commonest wrong answers): it lists the wrong keys the rollouts contradict with the true answer as
the proposed key, --fix writes a copy of the pool changed only in those keys, bad input is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import run_cli

ROLLOUT = ["--engine", "hf", "--max-tokens", "8", "--n", "8", "--seed", "0"]


def _truth(prompt: str) -> str:
    from gradsel.demo.tasks import answer_of, parse_prompt

    return str(answer_of(*parse_prompt(prompt)))


@pytest.fixture(scope="module")
def wrong_store(tmp_path_factory) -> tuple[Path, Path]:
    from benchmarks.truth import model_wrong_key
    from gradsel.demo.tasks import write_regime

    work = tmp_path_factory.mktemp("audit")
    write_regime(work / "data", "wrong-answer", size=40, val_size=8, seed=0, wrong_key=model_wrong_key("tiny-arith"))
    run_cli(
        "rollout", "-m", "tiny-arith", "-p", str(work / "data" / "pool.parquet"), "-s", str(work / "store"), *ROLLOUT
    )
    return work / "data", work / "store"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_audit_lists_contradicted_wrong_keys_and_fix_changes_only_them(wrong_store, tmp_path):
    data, store = wrong_store
    pool = data / "pool.parquet"
    before = _sha(pool)
    out, fix = tmp_path / "suspects.jsonl", tmp_path / "fixed.parquet"
    proc = run_cli("audit", "-s", str(store), "--out", str(out), "--fix", str(fix))
    summary = json.loads(proc.stdout)
    assert "suspect keys" in proc.stderr  # the table
    suspects = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["suspects"] == len(suspects) > 0

    wrong = set(json.loads((data / "pool.truth.json").read_text())["wrong_answer_ids"])
    rows = pq.read_table(pool).to_pylist()
    ids = [f"{r['data_source']}:{r['extra_info']['index']}" for r in rows]
    truth = {pid: _truth(r["prompt"][0]["content"]) for pid, r in zip(ids, rows)}
    # Every planted wrong key that most of the rollouts contradict with the true answer is listed,
    # and the true answer is proposed for it.
    from gradsel.review.audit import DEFAULT_THRESHOLD, AuditConfig, audit_stages, store_stages

    evidence = {e.problem_id: e for e in audit_stages(store_stages(store)[0], AuditConfig()).evidence}
    contradicted = {
        pid
        for pid in wrong
        if evidence[pid].plurality_answer == truth[pid]
        and evidence[pid].plurality_share - evidence[pid].key_share >= DEFAULT_THRESHOLD
    }
    assert contradicted, "the fixture should plant wrong keys the model's rollouts contradict"
    listed = {s["problem_id"]: s for s in suspects}
    assert contradicted <= set(listed)
    for pid in contradicted:
        assert listed[pid]["proposed_key"] == truth[pid]
    # The suspects hold more planted wrong keys than the pool does (benchmarks/audit.py measures how many).
    assert sum(pid in wrong for pid in listed) / len(listed) > len(wrong) / len(rows)

    # --fix: the pool untouched; the copy has the same schema and every column but the key
    # unchanged; the key changed exactly where the change list says.
    assert _sha(pool) == before
    changes = [json.loads(line) for line in (tmp_path / "fixed.parquet.changes.jsonl").read_text().splitlines()]
    assert {c["problem_id"] for c in changes} == {s["problem_id"] for s in suspects if s["proposed_key"] != s["key"]}
    for c in changes:
        assert f"changed {c['problem_id']}" in proc.stderr
    original, fixed = pq.read_table(pool), pq.read_table(fix)
    assert fixed.schema == original.schema
    for name in original.column_names:
        if name != "reward_model":
            assert fixed.column(name).equals(original.column(name)), name
    by_row = {c["source_row"]: c for c in changes}
    for i, (old, new) in enumerate(
        zip(original.column("reward_model").to_pylist(), fixed.column("reward_model").to_pylist())
    ):
        assert new["style"] == old["style"]
        if i in by_row:
            assert old["ground_truth"] == by_row[i]["old_key"] and new["ground_truth"] == by_row[i]["new_key"]
        else:
            assert new == old


def test_audit_parquet_out_and_determinism(wrong_store, tmp_path):
    _, store = wrong_store
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    run_cli("audit", "-s", str(store), "--out", str(a))
    run_cli("audit", "-s", str(store), "--out", str(b))
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.num_rows > 0 and ta.equals(tb)
    assert {"suspicion", "proposed_key", "key_share", "plurality_share"} <= set(ta.column_names)


def test_audit_jsonl_pool_duplicates_and_byte_identical_fix(tmp_path):
    """OpenRLHF JSON lines: a near-duplicate question with a different label is flagged; --fix keeps
    every other line's bytes."""
    pool = tmp_path / "pool.jsonl"
    lines = [
        json.dumps({"input": "12+7=", "label": "19"}),
        json.dumps({"input": " 12 + 7 = ", "label": "91"}),
        json.dumps({"input": "3+4=", "label": "7"}),
        json.dumps({"input": "5+5=", "label": "10"}),
    ]
    pool.write_text("\n".join(lines) + "\n")
    run_cli("rollout", "-m", "tiny-arith", "-p", str(pool), "-s", str(tmp_path / "store"), *ROLLOUT, "--reward", "int")
    out, fix = tmp_path / "s.jsonl", tmp_path / "fixed.jsonl"
    run_cli("audit", "-s", str(tmp_path / "store"), "--out", str(out), "--fix", str(fix))
    suspects = {json.loads(line)["key"]: json.loads(line) for line in out.read_text().splitlines()}
    assert "91" in suspects and suspects["91"]["duplicate_keys"] == ["19"]
    fixed_lines = fix.read_bytes().split(b"\n")
    changed = {
        json.loads(line)["source_row"] for line in (tmp_path / "fixed.jsonl.changes.jsonl").read_text().splitlines()
    }
    assert 1 in changed
    for i, line in enumerate(lines):
        if i not in changed:
            assert fixed_lines[i] == line.encode()
    assert json.loads(fixed_lines[1])["label"] == suspects["91"]["proposed_key"] != "91"
    assert json.loads(fixed_lines[1])["input"] == " 12 + 7 = "


def test_audit_refuses_bad_input(wrong_store, tmp_path):
    data, store = wrong_store
    pool = data / "pool.parquet"
    before = _sha(pool)
    existing = tmp_path / "exists.jsonl"
    existing.write_text("keep\n")
    # The same pool with every key edited since the rollouts were judged.
    import pyarrow as pa

    edited = tmp_path / "edited"
    edited.mkdir()
    table = pq.read_table(pool)
    rm = table.column("reward_model").combine_chunks()
    keys = pa.array(["9" + k for k in rm.field("ground_truth").to_pylist()])
    table = table.set_column(
        table.schema.get_field_index("reward_model"),
        "reward_model",
        pa.StructArray.from_arrays([rm.field("style"), keys], names=["style", "ground_truth"]),
    )
    pq.write_table(table, edited / "pool.parquet")
    cases = [
        (["-s", str(tmp_path / "nostore")], "not a gradsel store"),
        (["-s", str(store), "--out", str(tmp_path / "x.csv")], "unknown format"),
        (["-s", str(store), "--fix", str(pool)], "is the pool itself"),
        (["-s", str(store), "--fix", str(tmp_path / "f.jsonl")], "not in the pool's format"),
        (["-s", str(store), "--out", str(existing)], "exists"),
        (["-s", str(store), "--threshold", "2"], "outside [0, 1]"),
        (["-s", str(store), "--teach-steps", "-1"], "negative"),
        (
            ["-s", str(store), "--fix", str(tmp_path / "f.parquet"), "--pool", str(tmp_path / "none.parquet")],
            "does not exist",
        ),
        (
            ["-s", str(store), "--fix", str(tmp_path / "f.parquet"), "--pool", str(edited / "pool.parquet")],
            "judged against",
        ),
        (
            ["-s", str(store), "--teach-steps", "2", "--teach-template", "####", "--out", str(tmp_path / "t.jsonl")],
            "has no {answer}",
        ),
    ]
    for args, message in cases:
        proc = run_cli("audit", *args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert err[0].startswith("error:") and message in err[0], (args, proc.stderr)
        assert err[1].startswith("hint:") and "Traceback" not in proc.stderr
    assert existing.read_text() == "keep\n" and _sha(pool) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "exists.jsonl"]
    assert [p.name for p in edited.iterdir()] == ["pool.parquet"]


def test_audit_taught_copy_is_deterministic(wrong_store, tmp_path):
    """--teach-steps: the validation-taught copy's evidence for every problem, the same twice."""
    data, store = wrong_store
    outs = []
    for name in ("a.parquet", "b.parquet"):
        proc = run_cli(
            "audit",
            "-s",
            str(store),
            "--teach-steps",
            "3",
            "--val",
            str(data / "val.parquet"),
            "--threshold",
            "0.3",
            "--out",
            str(tmp_path / name),
        )
        assert json.loads(proc.stdout)["taught"] is True
        outs.append(pq.read_table(tmp_path / name))
    assert outs[0].num_rows > 0 and outs[0].equals(outs[1])
    rows = outs[0].to_pylist()
    assert all(r["taught_signal"] is not None and r["taught_logp_key"] is not None for r in rows)
    assert any(r["taught_alternative"] is not None for r in rows)


def test_audit_flat_or_missing_history_is_neutral(wrong_store, tmp_path):
    """Two identical rounds (no trend) leave every suspicion as one round gives it: a flat history is
    no evidence for the key (averaged in as a 0 it halved every suspicion). A real second round
    (another sampling seed), at a history weight > 0 (the default is 0), moves a problem's
    suspicion only in the direction of its history signal."""
    from gradsel.review.audit import AuditConfig, audit_stages, store_stages

    _, store = wrong_store
    (stage,), _ = store_stages(store)
    one = {e.problem_id: e for e in audit_stages([stage], AuditConfig()).evidence}
    flat = {e.problem_id: e for e in audit_stages([stage, stage], AuditConfig(history_weight=0.5)).evidence}
    assert any(e.suspect for e in one.values())
    for pid, e in flat.items():
        assert e.rounds == 2 and e.key_share_trend == 0.0
        assert e.history_signal in (None, 0.0)
        assert e.suspicion == one[pid].suspicion and e.suspect == one[pid].suspect

    other = tmp_path / "store"
    run_cli(
        "rollout", "-m", "tiny-arith", "-p", str(wrong_store[0] / "pool.parquet"), "-s", str(other), *ROLLOUT[:-1], "1"
    )
    (later,), _ = store_stages(other)
    last = {e.problem_id: e for e in audit_stages([later], AuditConfig()).evidence}
    both = audit_stages([stage, later], AuditConfig(history_weight=0.5)).evidence
    assert any(e.history_signal for e in both)
    for e in both:
        moved = e.suspicion - last[e.problem_id].suspicion
        h = e.history_signal or 0.0
        assert (moved > 0) <= (h > 0) and (moved < 0) <= (h < 0) and (h == 0) <= (moved == 0), e
