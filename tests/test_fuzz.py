"""Fuzzing with hypothesis: random rows and random bytes through the problem readers, random
argument lists through the CLI. Every input ends as valid problems or as the clear error
(GradselError; `error:` + `hint:` and exit 2 on the command line), never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import string
import sys
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsel.core.errors import GradselError
from gradsel.inputs.problems import read_problems

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", 3]),
            "content": st.one_of(st.text(max_size=30), st.none()),
        }
    ),
    max_size=3,
)
rows = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=30), messages, json_values),
        "input": st.one_of(st.text(max_size=30), json_values),
        "label": st.one_of(st.text(max_size=10), st.integers(), st.floats(allow_nan=True), st.none()),
        "reward_model": st.one_of(
            st.fixed_dictionaries({"ground_truth": scalars}, optional={"style": st.sampled_from(["rule", "int", 5])}),
            json_values,
        ),
        "data_source": st.one_of(st.text(max_size=10), st.integers()),
        "extra_info": st.one_of(
            st.fixed_dictionaries(
                {"index": st.one_of(st.integers(0, 20), st.text(max_size=3), st.booleans(), st.none())}
            ),
            json_values,
        ),
    },
)


def _outcome(path: Path, **kw) -> str:
    try:
        problems = read_problems(path, **kw)
    except GradselError as exc:
        assert exc.message and exc.hint, exc
        return "error"
    assert problems.problems and len({p.problem_id for p in problems.problems}) == len(problems.problems)
    for p in problems.problems:
        assert p.messages() and isinstance(p.ground_truth, str)
    return "ok"


@FUZZ
@given(
    st.lists(rows, min_size=0, max_size=6),
    st.sampled_from([None, "input", "extra_info"]),
    st.sampled_from([None, "label", "reward_model.ground_truth", "a.b"]),
)
def test_random_jsonl_rows(tmp_path, batch, prompt_key, answer_key):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in batch))
    _outcome(path, prompt_key=prompt_key, answer_key=answer_key)


@FUZZ
@given(st.lists(rows, min_size=1, max_size=6))
def test_random_parquet_rows(tmp_path, batch):
    path = tmp_path / "pool.parquet"
    try:
        pq.write_table(pa.Table.from_pylist(batch), path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return  # rows Arrow itself cannot hold in one Parquet file never reach gradsel
    _outcome(path)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["pool.jsonl", "pool.parquet"]))
def test_random_bytes(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    _outcome(path)


# -- the command line -----------------------------------------------------------------------------

COMMANDS = ["score", "select", "refresh", "rollout", "info", "snapshot", "demo-data", "nope", ""]
# (no --size: a random large number would make demo-data build a huge pool, which is not an error)
OPTIONS = [
    "--store",
    "--top-k",
    "--ratio",
    "--all",
    "--mode",
    "--band",
    "--format",
    "--out",
    "--diverse",
    "--target",
    "--index",
    "--balance",
    "--balance-weights",
    "--min-score",
    "--model",
    "--pool",
    "--val",
    "--problems",
    "--n",
    "--sketch",
    "--feature",
    "--dtype",
    "--device",
    "--seed",
    "--chunk-size",
    "--max-tokens-per-batch",
    "--shard-size",
    "--engine",
    "--regime",
    "-q",
    "--verbose",
]
VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "1.5",
            "nan",
            "16x",
            "0x0",
            "gradalign",
            "flat",
            "max",
            "-",
            "verl",
            "1e309",
            "0.2,0.1",
            "a=1,b",
            "tiny-arith",
            "",
        ]
    ),
    st.text(alphabet=string.printable, max_size=12),
)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(COMMANDS), st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES), max_size=5))
def test_random_arguments_never_give_a_traceback(tmp_path_factory, command, pairs):
    import gradsel.cli.app as cli

    missing = tmp_path_factory.mktemp("fuzz") / "does-not-exist"  # every path the fuzzer names is absent
    argv = [command] if command else []
    for option, value in pairs:
        argv.append(option)
        if option not in ("--all", "-q", "--verbose"):
            argv.append(
                str(missing / value.replace("/", "_"))
                if option in ("--store", "--pool", "--val", "--problems", "--out")
                else value
            )
    err = io.StringIO()
    # The console writes to whatever sys.stderr is at the time (redirected below). Setting its
    # `file` would pin it to this test's stream for every later test in the process.
    old_argv = sys.argv
    sys.argv = ["gradsel", *argv]
    try:
        # In process, for speed; protect_stdout would re-point this test process's own fd 1.
        with (
            mock.patch.object(cli.console, "protect_stdout", lambda: sys.stdout),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            with pytest.raises(SystemExit) as exit_info:
                cli.main()
    finally:
        sys.argv = old_argv
        cli.console.set_verbosity()
    text = err.getvalue()
    assert "Traceback" not in text, (argv, text)
    assert exit_info.value.code in (0, 2), (argv, exit_info.value.code, text)
    if exit_info.value.code == 2:
        assert text.startswith("error:") and "hint:" in text, (argv, text)
