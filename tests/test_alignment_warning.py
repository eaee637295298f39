"""The paper's cosine is an estimate under the default `score --alignment sketch`, and gradsel
says so (issue 26, item 5): every selection that ranks by score_cos (or score_dot) on a sketch
store prints one `warning:` line naming `score --alignment lowrank`; `gradsel info` says which
alignment the store holds; a store rescored with `--alignment lowrank` selects without it."""

import json
import shutil

import pytest

from helpers import run_cli

SCORE = ["--model", "tiny-arith", "--engine", "hf", "--max-tokens", "6", "--n", "4", "--n-val", "4"]


def warnings_of(proc) -> list[str]:
    """The `warning:` messages on stderr, each with its wrapped lines joined."""
    return [" ".join(("warning:" + w).split()) for w in proc.stderr.split("warning:")[1:]]


def select(store, *args):
    return run_cli("select", "--store", str(store), "--top-k", "5", "--format", "ids", *args)


@pytest.fixture(scope="module")
def sketch_store(noisy_data, tmp_path_factory):
    store = tmp_path_factory.mktemp("align") / "store"
    run_cli(
        "-q",
        "score",
        *SCORE,
        "--pool",
        str(noisy_data / "pool.parquet"),
        "--val",
        str(noisy_data / "val.parquet"),
        "--store",
        str(store),
    )
    return store


@pytest.mark.parametrize(
    "args",
    [
        ["--mode", "gradalign", "--target", "mean"],
        ["--mode", "simacc", "--target", "mean"],
        ["--mode", "reliable", "--target", "mean"],
        ["--mode", "dot"],
    ],
)
def test_a_mode_that_reads_the_sketch_cosine_warns_once(sketch_store, args):
    found = warnings_of(select(sketch_store, *args))
    assert len(found) == 1, found
    assert "score --alignment lowrank" in found[0] and "sketch" in found[0]


@pytest.mark.parametrize(
    "args", [[], ["--mode", "gradalign", "--target", "subspace"], ["--mode", "accgreedy"], ["--mode", "random"]]
)
def test_a_mode_that_does_not_read_it_is_silent(sketch_store, args):
    assert warnings_of(select(sketch_store, *args)) == []


def test_report_warns_once_for_all_its_modes(sketch_store, tmp_path):
    proc = run_cli(
        "report",
        "--store",
        str(sketch_store),
        "--out",
        str(tmp_path / "r.html"),
        "--top-k",
        "5",
        "--mode",
        "gradalign",
        "--target",
        "mean",
    )
    assert len([w for w in warnings_of(proc) if "score --alignment lowrank" in w]) == 1


def test_info_names_the_alignment_and_lowrank_scores_select_silently(sketch_store, noisy_data, tmp_path):
    store = tmp_path / "store"  # a copy: the other tests read the sketch store
    shutil.copytree(sketch_store, store)
    info = run_cli("info", "--store", str(store))
    assert json.loads(info.stdout)["projector"]["alignment"] == "sketch"
    assert "score_cos is estimated from the sketched vectors" in " ".join(info.stderr.split())
    run_cli(
        "-q",
        "score",
        *SCORE,
        "--pool",
        str(noisy_data / "pool.parquet"),
        "--val",
        str(noisy_data / "val.parquet"),
        "--store",
        str(store),
        "--alignment",
        "lowrank",
    )
    info = run_cli("info", "--store", str(store))
    assert json.loads(info.stdout)["projector"]["alignment"] == "lowrank"
    assert "lowrank: score_cos from the gradient pass" in " ".join(info.stderr.split())
    assert warnings_of(select(store, "--mode", "gradalign", "--target", "mean")) == []
