"""Selection: every mode on a hand-made store, faithful output, pipes, refusals, and the demo."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradsel.core.errors import GradselError
from gradsel.core.fsutil import atomic_write_json, atomic_write_table
from gradsel.core.schema import SCORES, vectors_table
from gradsel.demo.tasks import write_regime
from gradsel.inputs.problems import read_problems
from gradsel.rollout.stage import problems_to_table
from gradsel.selection.select import SelectConfig, select
from gradsel.store.directory import FORMAT_VERSION, Store, write_shard
from helpers import GRADSEL, ROOT, assert_user_error, run_cli

SPEC = {
    "feature": "projected",
    "seed": 0,
    "k_out": 2,
    "k_in": 2,
    "blocks": 1,
    "modules": ["m"],
    "dims": [[4, 4]],
    "dtype": "float32",
    "kind": "rademacher",
}
# problem: (cos, dot, pass_rate, zero_advantage, data_source, unit vector)
HANDMADE = {
    "0": (0.9, 0.5, 0.25, False, "a", [1, 0, 0, 0]),
    "1": (0.8, 2.0, 0.50, False, "a", [1, 0, 0, 0]),
    "2": (0.1, 0.1, 0.75, False, "b", [0, 1, 0, 0]),
    "3": (-0.5, -1.0, 0.375, False, "b", [0, 0, 1, 0]),
    "4": (0.0, 0.0, 1.00, True, "a", [0, 0, 0, 0]),
    "5": (0.3, 0.9, 0.125, False, "b", [0.6, 0.8, 0, 0]),
}


@pytest.fixture
def store(tmp_path):
    pool = tmp_path / "pool.jsonl"
    # No data_source in the rows, so the ids are the bare indices the hand-made scores use.
    pool.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"{i}+1="}],
                    "reward_model": {"style": "rule", "ground_truth": str(int(i) + 1)},
                    "extra_info": {"index": int(i)},
                }
            )
            + "\n"
            for i in HANDMADE
        )
    )
    root = tmp_path / "store"
    problem_set = read_problems(pool)
    atomic_write_table(root / "rollouts/train/problems.parquet", problems_to_table(problem_set.problems))
    features = root / "features/f0"
    rows = [
        {
            "problem_id": pid,
            "split": "train",
            "data_source": src,
            "n_rollouts": 8,
            "pass_rate": pr,
            "reward_mean": pr,
            "reward_std": 0.0 if zero else 0.5,
            "zero_advantage": zero,
            "grad_norm": 0.0 if zero else 1.0,
            "score_cos": cos,
            "score_dot": dot,
            "judge_consistency": 0.5 if pid == "0" else 1.0,
        }
        for pid, (cos, dot, pr, zero, src, _) in HANDMADE.items()
    ]
    rows.append({**rows[0], "problem_id": "v0", "split": "val"})
    atomic_write_table(features / "scores.parquet", pa.Table.from_pylist(rows, schema=SCORES))
    write_shard(
        features / "train",
        0,
        vectors_table(
            list(HANDMADE),
            np.array([v[-1] for v in HANDMADE.values()]),
            [float(any(v[-1])) for v in HANDMADE.values()],
            dtype="float32",
        ),
    )
    write_shard(features / "val", 0, vectors_table(["v0"], np.array([[0, 0, 1, 0]]), [1.0], dtype="float32"))
    atomic_write_json(features / "spec.json", {"projector": SPEC})
    atomic_write_json(
        root / "manifest.json",
        {
            "format_version": FORMAT_VERSION,
            "projector": SPEC,
            "features": "features/f0",
            "rollouts": {
                "train": {
                    "problems_file": str(pool),
                    "problems_sha256": problem_set.content_hash,
                    "sampling": {"n": 8},
                    "engine": "hf",
                }
            },
        },
    )
    return Store(root)


def picks(store, **kw):
    return select(store, SelectConfig(**({"top_k": 3} | kw))).problem_ids


def test_every_mode_on_a_handmade_table(store):
    assert picks(store, mode="gradalign", target="mean") == ["0", "1", "5"]  # the paper's cosine
    assert picks(store, mode="dot") == ["1", "5", "0"]
    assert picks(store, mode="accgreedy") == ["1", "3", "0"]  # |pass - 0.5|: 0, 0.125, 0.25 (tie with 2 by id)
    assert picks(store, mode="simacc", target="mean") == ["1", "0", "5"]  # cos*4p(1-p): 0.8, 0.675, 0.131
    assert picks(store, mode="learnalign") == ["5", "0", "1"]  # mean direction (2.6, 1.8, 1, 0)/5
    assert picks(store, mode="reliable", target="mean") == ["1", "5", "2"]  # 0's judge contradicted itself
    assert sorted(picks(store, mode="band", band=(0.3, 0.8), top_k=3)) == ["1", "2", "3"]
    assert picks(store, mode="random", seed=1) == picks(store, mode="random", seed=1)
    assert "4" not in picks(store, mode="random", all=True, top_k=None)  # zero advantage excluded
    assert "4" in picks(store, mode="random", all=True, top_k=None, include_zero_advantage=True)
    cosine = dict(mode="gradalign", target="mean")
    assert picks(store, **cosine, all=True, top_k=None) == ["0", "1", "5", "2", "3"]
    assert picks(store, **cosine, min_score=0.2, top_k=None, all=True) == ["0", "1", "5"]
    assert picks(store, mode="gradalign", target="max", top_k=1) == [
        "3"
    ]  # the only candidate along the val problem's vector
    assert picks(store, mode="gradalign", target="subspace", top_k=1) == ["3"]  # the only one in the val span
    # The default: reliable, by the share of each candidate in the validation vectors' span (vectors
    # are stored). 1, 2, 5 tie at 0 (ids break it); 0 sinks: its judge is unreliable.
    assert picks(store, top_k=2) == picks(store, mode="reliable", target="subspace", top_k=2) == ["3", "1"]
    assert picks(store, **cosine, diverse=0.5, top_k=2) == ["0", "2"]  # 1 duplicates 0; 2 is orthogonal to it
    assert sorted(picks(store, **cosine, balance="data_source", top_k=2)) == ["0", "5"]  # one from each source


def test_variance_ranks_by_the_pass_rates_p_one_minus_p(store):
    """p(1-p) of the pass rate, highest first: 1 (0.25), 3 (0.234), then 0 and 2 tie at 0.1875
    (ids break it), 5 (0.109); zero-advantage 4 (p = 1, variance 0) only when asked for, last."""
    chosen = select(store, SelectConfig(mode="variance", all=True))
    assert chosen.problem_ids == ["1", "3", "0", "2", "5"]
    assert chosen.scores == [0.25, 0.234375, 0.1875, 0.1875, 0.109375]
    assert picks(store, mode="variance", all=True, top_k=None, include_zero_advantage=True)[-1] == "4"
    assert picks(store, mode="variance", target="max") == picks(store, mode="variance")  # reads no target
    # 1/4 - (p - 1/2)^2: accgreedy's order, ties included; the scale is the variance's.
    assert picks(store, mode="accgreedy", all=True, top_k=None) == chosen.problem_ids
    assert picks(store, mode="variance", min_score=0.2, all=True, top_k=None) == ["1", "3"]


def test_auto_target_is_the_papers_for_the_papers_modes_and_subspace_for_reliable(store, tmp_path):
    """`--mode gradalign` without --target is the paper's method: the cosine with the validation
    gradient (mean), not the validation-span share, which ranks this store otherwise."""
    assert picks(store, mode="gradalign", target="subspace") == ["3", "0", "1"]  # the one in the val span first
    assert picks(store, mode="gradalign") == picks(store, mode="gradalign", target="mean") == ["0", "1", "5"]
    assert picks(store, mode="simacc") == picks(store, mode="simacc", target="mean") == ["1", "0", "5"]
    assert picks(store, mode="simacc", target="subspace") != picks(store, mode="simacc")
    assert (
        picks(store) == picks(store, mode="reliable", target="subspace") != picks(store, mode="reliable", target="mean")
    )
    # Through the CLI, and the selection manifest records the target that auto became.
    out = tmp_path / "gradalign.txt"
    run_cli(
        "select",
        "--store",
        str(store.root),
        "--mode",
        "gradalign",
        "--top-k",
        "3",
        "--format",
        "ids",
        "--out",
        str(out),
    )
    assert out.read_text().split() == ["0", "1", "5"]
    assert json.loads((tmp_path / "gradalign.txt.gradsel.json").read_text())["config"]["target"] == "mean"


def test_subspace_share_is_the_norm_of_the_projection_onto_the_validation_span(store):
    """Sign-blind and basis-free: what matters is the span of the validation vectors."""
    from gradsel.selection.targets import subspace_share
    from gradsel.store.vectors import VectorSet

    train = VectorSet(store.root / "features/f0", "train")
    queries = np.array([[0, 0, 1, 0], [0, 1, 1, 0]], dtype=np.float32)  # spans e2 and e3
    expected = [0.0, 0.0, 1.0, 1.0, 0.0, 0.8]  # rows 0-5 of HANDMADE: e0, e0, e1, e2, zero, (0.6, 0.8, 0, 0)
    np.testing.assert_allclose(subspace_share(train, queries, max_rank=4), expected, atol=1e-6)
    np.testing.assert_allclose(subspace_share(train, -queries[::-1], max_rank=4), expected, atol=1e-6)


def test_subspace_share_weighs_every_module_alike(store):
    """Two modules of two dimensions each: a candidate's share is the mean over modules of the
    cosine between its slice and the validation span in that module, whatever the slices' norms."""
    from gradsel.selection.targets import module_bases, subspace_share
    from gradsel.store.vectors import VectorSet

    train = VectorSet(store.root / "features/f0", "train")
    queries = np.array([[3, 0, 0, 1], [5, 0, 0, 0]], dtype=np.float32)  # module 0: e0; module 1: e1 (one query)
    # HANDMADE rows: (1,0|0,0) (1,0|0,0) (0,1|0,0) (0,0|1,0) zero (0.6,0.8|0,0); zero slices count 0.
    expected = [0.5, 0.5, 0.0, 0.0, 0.0, 0.3]
    np.testing.assert_allclose(subspace_share(train, queries, units=2, max_rank=2), expected, atol=1e-6)
    # Past max_rank, the basis is the queries' top principal directions, and every query counts
    # alike whatever its norm: for e0 (norm 3) and (0.6, 0.8) (norm 0.1), the bisector of the two.
    bases, live = module_bases(np.array([[3, 0], [0.06, 0.08]], dtype=np.float32), units=1, max_rank=1)
    assert bases.shape == (1, 2, 1) and live.tolist() == [True]
    np.testing.assert_allclose(np.abs(bases[0, :, 0]), np.array([1.6, 0.8]) / np.hypot(1.6, 0.8), atol=1e-6)
    # A module where no query has a gradient is left out of every candidate's mean.
    bases, live = module_bases(np.array([[1, 0, 0, 0]], dtype=np.float32), units=2)
    assert live.tolist() == [True, False]
    np.testing.assert_allclose(
        subspace_share(train, np.array([[1, 0, 0, 0]], dtype=np.float32), units=2),
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.6],
        atol=1e-6,
    )


def test_subspace_scores_follow_the_ids_when_the_scores_table_is_in_another_order(store):
    """The scores table normally lists the train split in store order, and select uses a row as a
    vector position; a table in any other order must still give each problem its own share."""
    expected = picks(store, mode="gradalign", target="subspace", top_k=5)
    assert expected[0] == "3"  # the one vector in the validation span (e2)
    path = store.root / "features/f0/scores.parquet"
    table = pq.read_table(path)
    atomic_write_table(path, table.take(np.arange(table.num_rows)[::-1].copy()))
    assert picks(store, mode="gradalign", target="subspace", top_k=5) == expected


def test_refusals(store):
    with pytest.raises(GradselError, match="only 5 are eligible"):
        picks(store, top_k=6)
    assert len(picks(store, top_k=6, allow_fewer=True)) == 5
    with pytest.raises(GradselError, match="unknown mode"):
        picks(store, mode="best")
    with pytest.raises(GradselError, match="outside"):
        picks(store, mode="band", band=(0.5, 1.5))
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["projector"] = {**SPEC, "seed": 1, "k_in": 4}
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GradselError, match="spec mismatch in k_in, seed"):
        picks(store)


def test_output_rows_equal_input_rows(store, tmp_path):
    pool_lines = (tmp_path / "pool.jsonl").read_bytes().splitlines()
    run_cli(
        "select", "--store", str(store.root), "--top-k", "3", "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")
    )
    # The default (reliable, share in the validation span): 3, then 1, 2 and 5 tie at 0 (ids break it).
    assert (tmp_path / "o.jsonl").read_bytes().splitlines() == [pool_lines[3], pool_lines[1], pool_lines[2]]
    meta = json.loads((tmp_path / "o.jsonl.gradsel.json").read_text())
    assert meta["selected"] == 3 and meta["mode"] == "reliable" and meta["config"]["target"] == "subspace"
    proc = run_cli(
        "select",
        "--store",
        str(store.root),
        "--top-k",
        "3",
        "--format",
        "jsonl",
        "--out",
        str(tmp_path / "o.jsonl"),
        check=False,
    )
    assert proc.returncode == 2 and "exists" in proc.stderr
    for fmt, check in (
        ("ids", lambda b: b.decode().split() == ["3", "1", "2"]),
        (
            "openrlhf",
            lambda b: json.loads(b.splitlines()[0]) == {"input": [{"role": "user", "content": "3+1="}], "label": "4"},
        ),
    ):
        assert check(run_cli("select", "--store", str(store.root), "--top-k", "3", "--format", fmt).stdout.encode())


def test_verl_round_trip_on_demo_data(tmp_path):

    pool, val = write_regime(tmp_path / "data", "noisy", size=48, val_size=12, seed=2)
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp_path / "s"),
        "--engine",
        "hf",
        "--max-tokens",
        "8",
        "--n",
        "6",
    )
    run_cli(
        "select",
        "--store",
        str(tmp_path / "s"),
        "--top-k",
        "10",
        "--format",
        "verl",
        "--out",
        str(tmp_path / "sel.parquet"),
    )
    selected = pq.read_table(tmp_path / "sel.parquet")
    original = pq.read_table(pool)
    assert selected.schema.equals(original.schema)
    by_index = {r["extra_info"]["index"]: r for r in original.to_pylist()}
    assert [by_index[r["extra_info"]["index"]] for r in selected.to_pylist()] == selected.to_pylist()
    from datasets import load_dataset  # what verl's RLHFDataset uses

    ds = load_dataset("parquet", data_files=str(tmp_path / "sel.parquet"))["train"]
    assert len(ds) == 10 and ds[0]["prompt"][0]["role"] == "user"
    annotated = run_cli(
        "select", "--store", str(tmp_path / "s"), "--top-k", "3", "--annotate", "--format", "jsonl"
    ).stdout
    assert [json.loads(line)["gradsel_rank"] for line in annotated.splitlines()] == [1, 2, 3]
    # variance on this scored store: p(1-p) of the scores table's pass rates, descending, ties by id.
    scores = pq.read_table(next((tmp_path / "s/features").glob("*/scores.parquet"))).to_pylist()
    expected = sorted(
        (
            (r["pass_rate"] * (1 - r["pass_rate"]), r["problem_id"])
            for r in scores
            if r["split"] == "train" and not r["zero_advantage"]
        ),
        key=lambda t: (-t[0], t[1]),
    )
    assert len({v for v, _ in expected}) >= 2  # a ranking with something to order
    rows = [
        json.loads(line)
        for line in run_cli(
            "select",
            "--store",
            str(tmp_path / "s"),
            "--mode",
            "variance",
            "--all",
            "--annotate",
            "--format",
            "openrlhf",
        ).stdout.splitlines()
    ]
    assert [r["gradsel_score"] for r in rows] == [v for v, _ in expected]
    ids = run_cli("select", "--store", str(tmp_path / "s"), "--mode", "variance", "--all", "--format", "ids").stdout
    assert ids.split() == [pid for _, pid in expected]


def test_pipe_into_another_process(store):
    reader = (
        "import sys, json\nrows = [json.loads(l) for l in sys.stdin]\nprint(len(rows), rows[0]['extra_info']['index'])"
    )
    producer = subprocess.Popen(
        [*GRADSEL, "select", "--store", str(store.root), "--top-k", "2", "--format", "jsonl", "--out", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    out = subprocess.run([sys.executable, "-c", reader], stdin=producer.stdout, capture_output=True, text=True)
    producer.stdout.close()
    assert producer.wait() == 0
    assert out.stdout.split() == ["2", "3"]


def test_parquet_is_not_written_to_a_terminal(store):
    """The defaults (--format verl, --out -) in a terminal: a clear error before any work, and
    nothing but the error on the terminal; a text format still prints there."""
    import os
    import pty

    def on_terminal(*args):
        parent, child = pty.openpty()
        proc = subprocess.run(
            [*GRADSEL, "select", "--store", str(store.root), "--top-k", "2", *args],
            stdout=child,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=os.environ | {"NO_COLOR": "1"},
        )
        os.close(child)
        shown = b""
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
        os.close(parent)
        return proc, shown

    proc, shown = on_terminal()
    assert proc.returncode == 2 and "refusing to write Parquet" in proc.stderr and "--format jsonl" in proc.stderr
    assert shown == b""
    proc, shown = on_terminal("--format", "ids")
    assert proc.returncode == 0 and len(shown.split()) == 2


def test_missing_store_and_missing_scores(tmp_path):
    proc = run_cli("select", "--store", str(tmp_path / "none"), "--top-k", "1", check=False)
    assert proc.returncode == 2 and "not a gradsel store" in proc.stderr
    atomic_write_json(tmp_path / "s/manifest.json", {"format_version": FORMAT_VERSION})
    proc = run_cli("select", "--store", str(tmp_path / "s"), "--top-k", "1", check=False)
    assert proc.returncode == 2 and "has no scores" in proc.stderr


@pytest.mark.slow
def test_demo_gradalign_beats_random_on_the_noisy_pool(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path), "--engine", "hf", "--size", "200", "--seed", "0")
    result = json.loads(proc.stdout)
    shares = {m: r["corrupted_share"] for m, r in result["modes"].items()}
    assert shares["reliable"] < shares["gradalign"] < shares["random"] < shares["accgreedy"]
    assert result["projected_vs_exact_spearman"] > 0.8


def test_default_target_is_mean_where_the_store_holds_no_vectors(store):
    exact = {**SPEC, "feature": "exact"}
    atomic_write_json(store.root / "features/f0/spec.json", {"projector": exact})
    manifest = json.loads((store.root / "manifest.json").read_text())
    atomic_write_json(store.root / "manifest.json", {**manifest, "projector": exact})
    assert picks(store) == picks(store, mode="reliable", target="mean") == ["1", "5", "2"]
    with pytest.raises(GradselError, match="--target max needs gradient vectors"):
        picks(store, target="max")


def test_balance_weights(store):
    weighted = dict(mode="gradalign", target="mean", balance="data_source", top_k=4)
    assert picks(store, **weighted, balance_weights=(("a", 1.0), ("b", 3.0))) == ["0", "5", "2", "3"]
    # a has only 2 eligible problems: its unmet quota goes to b
    assert picks(store, **weighted, balance_weights=(("a", 10.0), ("b", 1.0))) == ["0", "1", "5", "2"]
    assert picks(store, **(weighted | {"top_k": 2}), balance_weights=(("b", 1.0),)) == ["5", "2"]  # a unnamed: none
    with pytest.raises(GradselError, match="names c, not a data_source"):
        picks(store, **weighted, balance_weights=(("c", 1.0),))
    with pytest.raises(GradselError, match="needs --balance"):
        picks(store, balance_weights=(("a", 1.0),))


@pytest.mark.parametrize("kind", ["flat", "ivf"])  # ivfpq's codes are too coarse for 6 points: see below
def test_every_index_kind_selects_on_the_handmade_store(store, kind):
    assert picks(store, mode="learnalign", index=kind) == ["5", "0", "1"]
    assert picks(store, mode="gradalign", target="max", top_k=1, index=kind) == ["3"]
    assert (store.root / f"features/f0/index/train.{kind}.faiss").is_file()  # saved beside the vectors


def _vector_dir(root, vectors, shard=1000):
    for s, start in enumerate(range(0, len(vectors), shard)):
        part = vectors[start : start + shard]
        write_shard(
            root / "train", s, vectors_table([f"p{start + i}" for i in range(len(part))], part, np.ones(len(part)))
        )
    return root


def _clustered(n, dim, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, dim))
    v = centers[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def test_index_is_saved_reused_and_rebuilt_when_the_vectors_change(tmp_path):
    from gradsel.selection.index import best_alignment, open_index
    from gradsel.store.vectors import VectorSet

    directory = _vector_dir(tmp_path / "f", _clustered(3000, 64, 0))
    exact = VectorSet(directory, "train").load()
    queries = exact[[5, 700, 2900]]
    truth = set(np.argsort(-(exact @ queries.T).max(axis=1))[:30])
    for kind, recall in (("flat", 1.0), ("ivf", 0.9), ("ivfpq", 0.8)):
        index, ids, params = open_index(VectorSet(directory, "train"), kind)
        assert index.ntotal == 3000 and ids[:2] == ["p0", "p1"]
        best = best_alignment(
            index, params, queries, fetch=300, vectors=VectorSet(directory, "train")
        )  # select fetches 10 k
        found = set(np.argsort(-best)[:30])
        assert len(found & truth) / 30 >= recall, kind
        scored = np.isfinite(best)  # what the index proposed is scored exactly
        np.testing.assert_allclose(best[scored], (exact @ queries.T).max(axis=1)[scored], rtol=1e-5, atol=1e-6)
    saved = directory / "index/train.ivf.faiss"
    stamp = saved.stat().st_mtime_ns
    open_index(VectorSet(directory, "train"), "ivf")
    assert saved.stat().st_mtime_ns == stamp  # reused, not rebuilt
    _vector_dir(directory, _clustered(3000, 64, 1))  # new vectors: the saved index is stale
    fresh = VectorSet(directory, "train")  # a VectorSet reads the shards' fingerprint once: a new one sees them
    index, _, params = open_index(fresh, "flat")
    assert saved.stat().st_mtime_ns == stamp  # only the kind asked for is rebuilt
    vectors = fresh.load()
    np.testing.assert_allclose(
        best_alignment(index, params, vectors[:1], fetch=1, vectors=fresh), (vectors @ vectors[0]), rtol=1e-5, atol=1e-6
    )
    (directory / "index/train.flat.faiss").write_bytes(b"not an index")  # damaged: rebuilt, not read
    index, _, params = open_index(VectorSet(directory, "train"), "flat")
    assert index.ntotal == 3000


def test_wide_vectors_are_read_in_smaller_batches(store, monkeypatch):
    """A batch holds at most READ_BYTES of float32, so a 7B model's wide vectors cannot make one
    16,384-row batch several GB; the vectors come out the same, in order."""
    from gradsel.store import vectors

    train = vectors.VectorSet(store.root / "features/f0", "train")
    whole = np.concatenate(list(train.batches()))
    monkeypatch.setattr(vectors, "READ_BYTES", 2 * 4 * 4)  # two rows of 4 float32
    chunks = list(train.batches())
    assert [len(c) for c in chunks] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_vectors_of_format_version_1_stores_read_as_before(tmp_path):
    """Stores written before format version 2 hold vectors as fixed-size lists of floats; they read
    exactly as the fixed-size binary vectors of version 2 do."""
    from gradsel.store.vectors import VectorSet

    v = _clustered(50, 8, 3)
    ids = [f"p{i}" for i in range(50)]
    element = pa.field("element", pa.float16(), nullable=False)
    old_schema = pa.schema(
        [
            ("problem_id", pa.string()),
            ("vector", pa.list_(element, 8)),
            ("norm", pa.float64()),
            ("target_dot", pa.float64()),
        ]
    )
    write_shard(
        tmp_path / "old/train",
        0,
        pa.table(
            {
                "problem_id": ids,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 8),
                "norm": np.ones(50),
                "target_dot": pa.nulls(50, pa.float64()),
            }
        ).cast(old_schema),
    )
    write_shard(tmp_path / "new/train", 0, vectors_table(ids, v, np.ones(50)))
    old, new = (VectorSet(tmp_path / d, "train") for d in ("old", "new"))
    assert old.ids == new.ids == ids and old.dim == new.dim == 8
    np.testing.assert_array_equal(old.load(), new.load())
    np.testing.assert_array_equal(new.load(), v.astype(np.float32))


def test_jsonl_rows_emitted_are_the_rows_selected(odd_jsonl_store):
    _, pool, _, store = odd_jsonl_store
    ids = run_cli("select", "--store", str(store), "--all", "--format", "ids", "--out", "-").stdout.split()
    emitted = run_cli("select", "--store", str(store), "--all", "--format", "jsonl", "--out", "-").stdout
    got = [f"{r['data_source']}:{r['extra_info']['index']}" for r in map(json.loads, emitted.splitlines())]
    assert got == ids and len(ids) > 0


def test_balance_on_a_missing_column_is_refused(odd_jsonl_store):
    _, _, _, store = odd_jsonl_store
    proc = run_cli(
        "select", "--store", str(store), "--top-k", "2", "--balance", "ability", "--format", "ids", check=False
    )
    assert_user_error(proc, "data_source")


def test_mixed_type_jsonl_field_to_parquet_is_refused_not_a_traceback(odd_jsonl_store, tmp_path):
    _, _, _, store = odd_jsonl_store
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


def test_out_that_is_a_directory(odd_jsonl_store, tmp_path):
    _, _, _, store = odd_jsonl_store
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


def test_a_closed_pipe_is_not_an_error(odd_jsonl_store):
    _, _, _, store = odd_jsonl_store
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
