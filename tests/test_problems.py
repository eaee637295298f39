import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradsel.core.errors import GradselError
from gradsel.inputs.problems import read_problems
from verl_data import gsm8k_rows, math_rows, write_parquet


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_verl_parquet_rows(noisy_data):
    ps = read_problems(noisy_data / "pool.parquet")
    p = ps.problems[5]
    assert ps.format == "parquet" and p.problem_id == f"{p.data_source}:5" and p.source_row == 5
    assert p.messages()[0]["role"] == "user" and p.prompt[0]["content"].endswith("=")
    assert p.data_source.startswith("arith/") and p.reward_style in {"rule", "random"}


def test_openrlhf_jsonl_gets_content_hash_ids(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "2+3=", "label": 5}, {"input": "7*8=", "label": "56"}])
    ps = read_problems(path)
    assert [p.ground_truth for p in ps.problems] == ["5", "56"]
    assert all(p.problem_id.startswith("h") for p in ps.problems)
    again = read_problems(path)
    assert [p.problem_id for p in again.problems] == [p.problem_id for p in ps.problems]


def test_key_overrides(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1=", "meta": {"ans": "2"}}])
    (p,) = read_problems(path, prompt_key="question", answer_key="meta.ans").problems
    assert p.prompt == "1+1=" and p.ground_truth == "2"


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"input": "1+1=", "label": 2}\n{"input": oops}\n', ":2: invalid JSON"),
        (b'{"input": "1+1=", "label": 2}\n{"input": "\xff\xfe", "label": 1}\n', ":2: line is not valid UTF-8"),
        (b'{"input": "", "label": 2}\n', "non-empty"),
        (b'{"input": "1+1="}\n', "no usable reference answer"),
        (b"[1, 2]\n", "expected a JSON object"),
        (
            b'{"input": "1+1=", "label": 2, "extra_info": {"index": 1}}\n'
            b'{"input": "2+2=", "label": 4, "extra_info": {"index": 1}}\n',
            "duplicate problem id",
        ),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(GradselError) as err:
        read_problems(path)
    assert needle in err.value.message and err.value.hint


def test_bad_parquet_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(GradselError, match="not a readable Parquet"):
        read_problems(bad)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"prompt": [123], "label": ["1"]}), wrong)
    with pytest.raises(GradselError, match="row 1"):
        read_problems(wrong)
    with pytest.raises(GradselError, match="does not exist"):
        read_problems(tmp_path / "missing.parquet")


def test_missing_column_is_named_with_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1=", "label": 2}])
    with pytest.raises(GradselError) as err:
        read_problems(path)
    assert "missing prompt column" in err.value.message and "columns found: label, question" in err.value.message
    with pytest.raises(GradselError, match="missing answer column 'solution'"):
        read_problems(path, prompt_key="question", answer_key="solution")


def test_empty_prompts_list_every_row(tmp_path):
    rows = [{"input": f"{i}+1=" if i % 3 else " ", "label": i + 1} for i in range(9)]
    with pytest.raises(GradselError) as err:
        read_problems(write_jsonl(tmp_path / "p.jsonl", rows))
    assert err.value.message.split(": ")[1] == "lines 1, 4, 7"


def test_ids_are_unique_per_data_source_and_stable(tmp_path):
    rows = gsm8k_rows([(2, 3), (4, 1)], "train") + math_rows("train")  # both number from 0
    path = write_parquet(rows, tmp_path / "train.parquet")
    ids = [p.problem_id for p in read_problems(path).problems]
    assert ids == ["openai/gsm8k:0", "openai/gsm8k:1", *(f"DigitalLearningGmbH/MATH-lighteval:{i}" for i in range(4))]
    assert ids == [p.problem_id for p in read_problems(path).problems]


def test_pool_and_validation_ids_stay_apart(odd_jsonl_store):
    _, pool, val, store = odd_jsonl_store
    features = json.loads((store / "manifest.json").read_text())["features"]
    rows = pq.read_table(store / features / "scores.parquet").to_pylist()
    for split, path in (("train", pool), ("val", val)):
        truth = {p.problem_id: p.data_source for p in read_problems(path).problems}
        scored_sources = {r["problem_id"]: r["data_source"] for r in rows if r["split"] == split}
        assert scored_sources == truth
