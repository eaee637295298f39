"""`gradsel report` and per-stage cost: a rounds store scored for real, its costs checked against
the files, and the HTML report loaded in headless Chromium."""

import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from browser import Chromium, find_chromium
from gradsel.demo.tasks import write_regime
from gradsel.inputs.models import resolve_model_path
from gradsel.inputs.problems import read_problems
from helpers import ROOT, run_cli

SCORE = ["--engine", "hf", "--max-tokens", "8", "--n", "6", "--n-val", "6", "--shard-size", "16"]
STAGES = {"rollouts/train", "rollouts/val", "gradients/train", "gradients/val", "scores"}


@pytest.fixture(scope="module")
def rounds_store(tmp_path_factory):
    """Two rounds of a noisy pool (four data sources), the second at a "trained" checkpoint."""
    tmp = tmp_path_factory.mktemp("report")
    pool, val = write_regime(tmp / "data", "noisy", size=60, val_size=12, seed=3)
    ckpt2 = tmp / "ckpt2"
    shutil.copytree(resolve_model_path("tiny-arith"), ckpt2)
    cfg = json.loads((ckpt2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 1.1e-5  # a new content hash, the same weights
    (ckpt2 / "config.json").write_text(json.dumps(cfg))
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
        "30",
        *SCORE,
    )
    run_cli(
        "select",
        "--store",
        str(store),
        "--top-k",
        "6",
        "--allow-fewer",
        "--format",
        "ids",
        "--out",
        str(tmp / "r0.txt"),
    )
    run_cli(
        "refresh",
        "--store",
        str(store),
        "--model",
        str(ckpt2),
        "--top-k",
        "6",
        "--allow-fewer",
        "--format",
        "ids",
        "--out",
        str(tmp / "r1.txt"),
    )
    return store


def test_info_shows_what_each_stage_cost(rounds_store):
    proc = run_cli("info", "--store", str(rounds_store))
    costs = json.loads(proc.stdout)["costs"]
    assert set(costs) == STAGES
    assert "cost rollouts/train" in proc.stderr and "tokens at" in proc.stderr
    latest = rounds_store / "rounds/round-001"
    shards = sorted((latest / "rollouts/train").glob("shard-*.parquet"))
    rollouts = costs["rollouts/train"]
    assert rollouts["shards"] == len(shards) == 2  # 30 problems in shards of 16
    assert rollouts["bytes"] == sum(s.stat().st_size for s in shards)
    # The tokens counted are the responses generated, read back from the shards themselves.
    generated = sum(pc.sum(pc.list_value_length(pq.read_table(s).column("response_token_ids"))).as_py() for s in shards)
    assert rollouts["tokens"] == generated and rollouts["tokens_per_s"] > 0
    for name in STAGES:
        assert costs[name]["wall_s"] >= 0 and costs[name]["peak_rss_bytes"] > 100 * 2**20, name
    # The gradient pass runs each problem's prompt once and each distinct response once over it
    # (the shared-prompt pass, docs/algorithm.md): the prompt less its last token, then per
    # response that token and the response. Problems whose rewards all agree are not run, nor a
    # response whose copies' advantages cancel (a coin-flip judge paid the same answer 1 and 0).
    from gradsel.gradients import group_advantages

    table = pa.concat_tables(
        pq.read_table(s, columns=["problem_id", "prompt_token_ids", "response_token_ids", "reward"]) for s in shards
    ).to_pylist()
    by_problem: dict[str, list[dict]] = {}
    for row in table:
        by_problem.setdefault(row["problem_id"], []).append(row)
    expected = 0
    for rows in by_problem.values():
        advantages: dict[tuple, list[float]] = {}
        for row, a in zip(rows, group_advantages([row["reward"] for row in rows])):
            advantages.setdefault(tuple(row["response_token_ids"]), []).append(a)
        kept = [r for r, a in advantages.items() if abs(sum(a)) > 1e-12 * sum(map(abs, a))]
        if kept:
            expected += len(rows[0]["prompt_token_ids"]) - 1 + sum(1 + len(r) for r in kept)
    unshared = sum(len(row["prompt_token_ids"]) + len(row["response_token_ids"]) for row in table)
    assert costs["gradients/train"]["tokens"] == expected < unshared


def test_report_is_one_self_contained_deterministic_file(rounds_store, tmp_path):
    out = tmp_path / "report.html"
    result = json.loads(run_cli("report", "--store", str(rounds_store), "--out", str(out), "--top-k", "5").stdout)
    page = out.read_text()
    assert result["bytes"] == len(page.encode())
    assert page.count('<figure class="plot">') == 6
    # Nothing to fetch at view time: no script, stylesheet link, or external source.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<b>5</b> selected by <code>--mode reliable --target subspace</code>" in page
    for section in (
        "Pass rates by data source",
        "Score against pass rate",
        "What each mode would keep",
        "Judge consistency and validation alignment",
        "Rounds",
        "Cost per stage",
        "Projector and provenance",
    ):
        assert f"<h2>{section}</h2>" in page
    run_cli("report", "--store", str(rounds_store), "--out", str(tmp_path / "again.html"), "--top-k", "5")
    assert (tmp_path / "again.html").read_bytes() == out.read_bytes()
    refused = run_cli("report", "--store", str(rounds_store), "--out", str(out), check=False)
    assert refused.returncode == 2 and "exists" in refused.stderr and out.read_text() == page


@pytest.fixture
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip("headless Chromium not found: install Debian's `chromium` package (.ci/run does)")
    browser = Chromium(binary)
    yield browser
    browser.close()


PLOTS = """JSON.stringify([...document.querySelectorAll('figure.plot')].map(figure => {
  const svg = figure.querySelector('svg');
  if (!svg) return null;
  const box = svg.getBoundingClientRect();
  return {width: box.width, height: box.height, marks: svg.querySelectorAll('path, image, use, rect, text').length};
}))"""


def test_report_renders_in_headless_chromium(rounds_store, tmp_path, chromium):
    out = tmp_path / "report.html"
    run_cli("report", "--store", str(rounds_store), "--out", str(out))
    assert chromium.load(out.as_uri()) == []  # no console error, no exception
    plots = json.loads(chromium.evaluate(PLOTS))
    assert len(plots) == 6
    for plot in plots:
        assert plot is not None and plot["width"] > 300 and plot["height"] > 150 and plot["marks"] > 20, plot
    shot = tmp_path / "report.png"
    chromium.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    if os.environ.get("GRADSEL_DOCS_SCREENSHOT"):  # how docs/report.png is made
        shutil.copy(shot, ROOT / "docs" / "report.png")


def test_the_browser_harness_sees_errors_and_empty_plots(tmp_path, chromium):
    """The check above would pass on a broken page if the harness saw nothing."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<figure class="plot"><svg width="400" height="200"></svg></figure>'
        '<script>console.error("drawn wrong"); throw new Error("boom")</script>'
    )
    errors = chromium.load(page.as_uri())
    assert any("drawn wrong" in e for e in errors) and any("boom" in e for e in errors)
    assert json.loads(chromium.evaluate(PLOTS)) == [{"width": 400, "height": 200, "marks": 0}]


def test_info_shows_the_reward_used_per_data_source(odd_jsonl_store):
    _, pool, _, store = odd_jsonl_store
    info = json.loads(run_cli("info", "--store", str(store)).stdout)
    sources = [p.data_source for p in read_problems(pool).problems]
    assert info["rollouts"]["train"]["rewards"] == {s: {"int": sources.count(s)} for s in set(sources)}
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["rollouts"]["train"]["reward"] is None  # no --reward: chosen per row, recorded per source
