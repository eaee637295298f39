"""Problem readers: verl Parquet and JSONL (verl-shaped or OpenRLHF `input`/`label`).

Each problem keeps its row number in the source file (for JSON lines, its line index), so
selection can emit the original row unchanged, and gets a stable id: `data_source:index` from
`extra_info.index` when present (`index` alone without a data source), else a content hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradsel.core.errors import GradselError
from gradsel.core.fsutil import file_sha256


@dataclass(frozen=True)
class Problem:
    problem_id: str
    source_row: int
    prompt: list[dict[str, str]] | str  # a chat list, or a plain string
    ground_truth: str
    data_source: str = ""
    reward_style: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return self.prompt


@dataclass(frozen=True)
class ProblemSet:
    path: Path
    format: str  # "parquet" or "jsonl"
    problems: list[Problem]
    content_hash: str  # sha256 of the file bytes, so a cached stage notices an edited file


def _file_error(path: Path, what: str, hint: str, line: int | None = None) -> GradselError:
    where = f"{path}:{line}" if line is not None else str(path)
    return GradselError(f"{where}: {what}", hint)


def _read_parquet_rows(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise _file_error(
            path,
            f"not a readable Parquet file ({str(exc).splitlines()[0]})",
            "check the file is complete Parquet; use a .jsonl extension for JSON lines",
        ) from exc


def jsonl_lines(data: bytes) -> list[bytes]:
    """A JSON-lines file's physical lines: split on LF only, a trailing CR dropped (CRLF files), a
    UTF-8 BOM dropped. The reader and the selection writer both use this, so a problem's
    `source_row` (its line index) points at the same bytes for both."""
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # read as JSON lines; any other file as Parquet


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def original_rows(path: str | Path, source_rows: Sequence[int]):
    """The rows at `source_rows` (Problem.source_row), in that order, exactly as the file holds
    them: for JSON lines each line's bytes, split as the reader splits them (jsonl_lines, so a
    line index names the same bytes however the file ends its lines, with a BOM or with blank
    lines); for Parquet an Arrow table. A selection's output and a round's chunk both take a
    pool's rows through here."""
    if is_jsonl(path):
        lines = jsonl_lines(Path(path).read_bytes())
        return [lines[i] for i in source_rows]
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(path).take(pa.array(list(source_rows), pa.int64()))


def is_blank_line(line: bytes) -> bool:
    """Whitespace only, in Unicode's sense (a no-break space is blank too)."""
    return not line.decode("utf-8", "replace").strip()


def _read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line index, row) for every non-blank line."""
    rows = []
    for index, raw in enumerate(jsonl_lines(path.read_bytes())):
        lineno = index + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _file_error(
                path, f"line is not valid UTF-8 (byte {exc.start})", "re-encode the file as UTF-8", lineno
            ) from exc
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _file_error(
                path, f"invalid JSON ({exc.msg}, column {exc.colno})", "each line must hold one JSON object", lineno
            ) from exc
        if not isinstance(row, dict):
            raise _file_error(
                path, f"expected a JSON object, got {type(row).__name__}", "each line must hold one JSON object", lineno
            )
        rows.append((index, row))
    return rows


def _check_prompt(value: Any) -> list[dict[str, str]] | str | None:
    """Return the prompt if it is a non-empty string or chat list, else None."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)) and value:
        msgs = []
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return None
            msgs.append({"role": m["role"], "content": m["content"]})
        return msgs if any(m["content"].strip() for m in msgs) else None
    return None


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def problem_from_row(
    row: dict, source_row: int, *, prompt_key: str | None = None, answer_key: str | None = None
) -> Problem:
    """Map one verl, OpenRLHF or TRL row to a Problem; raise ValueError with what is wrong."""
    keys = [prompt_key] if prompt_key else ["prompt", "input"]
    key = next((k for k in keys if k in row), None)
    if key is None:
        raise ValueError(f"no prompt column (looked for {', '.join(keys)})")
    prompt = _check_prompt(row[key])
    if prompt is None:
        raise ValueError(f"column {key!r} must be a non-empty string or a list of {{role, content}} messages")

    reward_model = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    field = answer_field(row, answer_key)
    answer = _answer_text(_lookup(row, field) if field else None)
    if answer is None:
        raise ValueError(
            "no usable reference answer (reward_model.ground_truth, label or answer; a string or a number)"
        )

    extra_info = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    data_source = row.get("data_source") if isinstance(row.get("data_source"), str) else ""
    index = extra_info.get("index")
    if isinstance(index, (int, str)) and not isinstance(index, bool) and str(index) != "":
        # verl numbers extra_info.index from 0 in every file: the data source keeps a gsm8k row and
        # a MATH row of one concatenated pool apart.
        problem_id = f"{data_source}:{index}" if data_source else str(index)
    else:
        digest = hashlib.sha256(json.dumps([prompt, answer], sort_keys=True).encode()).hexdigest()
        problem_id = "h" + digest[:16]
    style = reward_model.get("style")
    return Problem(
        problem_id=problem_id,
        source_row=source_row,
        prompt=prompt,
        ground_truth=answer,
        data_source=data_source,
        reward_style=style if isinstance(style, str) else "",
        extra_info=extra_info,
    )


def answer_field(row: dict, answer_key: str | None = None) -> str | None:
    """The dotted name of the row's reference-answer field: `answer_key` when given, else verl's
    reward_model.ground_truth, else OpenRLHF's label, then answer, then ground_truth (None: none).
    `gradsel audit --fix` rewrites the key through the same name."""
    if answer_key:
        return answer_key
    if isinstance(row.get("reward_model"), dict) and "ground_truth" in row["reward_model"]:
        return "reward_model.ground_truth"
    return next((k for k in ("label", "answer", "ground_truth") if k in row), None)


def _lookup(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_problems(path: str | Path, *, prompt_key: str | None = None, answer_key: str | None = None) -> ProblemSet:
    """Read a problem file (.parquet, or .jsonl/.json lines) into validated Problems."""
    path = Path(path)
    if not path.is_file():
        raise GradselError(
            f"problem file {path} does not exist",
            "make one with `gradsel demo-data` or pass a verl Parquet / JSONL file",
        )
    fmt = "jsonl" if is_jsonl(path) else "parquet"
    rows = _read_jsonl_rows(path) if fmt == "jsonl" else list(enumerate(_read_parquet_rows(path)))
    if not rows:
        raise _file_error(path, "holds no problems", "the file must contain at least one row")
    _check_columns(path, rows[0][1], prompt_key, answer_key)
    problems, seen, bad = [], {}, {}
    label = "line" if fmt == "jsonl" else "row"
    for i, row in rows:
        try:
            p = problem_from_row(row, i, prompt_key=prompt_key, answer_key=answer_key)
        except ValueError as exc:
            bad.setdefault(str(exc), []).append(i + 1)
            continue
        if p.problem_id in seen:
            raise _file_error(
                path,
                f"duplicate problem id {p.problem_id!r} ({label}s {seen[p.problem_id] + 1} and {i + 1})",
                "make extra_info.index unique within each data_source, or drop it to use content hashes",
            )
        seen[p.problem_id] = i
        problems.append(p)
    if bad:
        message, lines = next(iter(bad.items()))
        shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
        raise _file_error(
            path,
            f"{label}{'s' if len(lines) > 1 else ''} {shown}: {message}",
            "fix those rows, or point --prompt-key/--answer-key at the right columns",
        )
    return ProblemSet(path=path.resolve(), format=fmt, problems=problems, content_hash=file_sha256(path))


def _check_columns(path: Path, first_row: dict, prompt_key: str | None, answer_key: str | None) -> None:
    """Name a missing column up front, with the columns that are there."""
    found = ", ".join(sorted(first_row)) or "none"
    prompt_keys = [prompt_key] if prompt_key else ["prompt", "input"]
    if not any(k in first_row for k in prompt_keys):
        raise _file_error(
            path,
            f"missing prompt column {' or '.join(map(repr, prompt_keys))} (columns found: {found})",
            "name the prompt column with --prompt-key",
        )
    if answer_key and _lookup(first_row, answer_key) is None and answer_key.split(".")[0] not in first_row:
        raise _file_error(
            path,
            f"missing answer column {answer_key!r} (columns found: {found})",
            "name the answer column with --answer-key; dots reach into structs",
        )
