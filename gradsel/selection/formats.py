"""Output formats: one record per format a selection is written in, in the shape of the rewards'
`REGISTRY`. A new format is one `Format` in `REGISTRY` (plus its test): `--format`'s choices and
help, `docs/cli.md` and the terminal rule (`check_output`) read the records.

A writer gets the selected problems in rank order (`Picked`) and returns the bytes to write: the
original rows, unchanged, where the format is the pool's own (verl Parquet from a Parquet pool,
JSON lines from a JSON-lines pool), else converted. `write_selection` writes them to --out or stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gradsel.core import console
from gradsel.core.choices import english_list
from gradsel.core.errors import GradselError
from gradsel.inputs.problems import is_jsonl, original_rows

ANNOTATIONS = ("gradsel_rank", "gradsel_score", "gradsel_mode")  # --annotate's columns


@dataclass(frozen=True)
class Picked:
    """The selected problems, best first, as the writers read them."""

    problem_ids: list[str]
    problems: dict[str, dict]  # problem id -> its row of rollouts/train/problems.parquet
    source: Path  # the pool file, checked against its hash: the original rows come from here
    annotations: list[dict]  # per problem, ANNOTATIONS -> value
    annotate: bool  # --annotate: add the annotations to every row

    def extra(self, i: int) -> dict:
        """What the i-th row gains: its annotations with --annotate, else nothing."""
        return self.annotations[i] if self.annotate else {}

    def source_rows(self):
        """The original rows (original_rows): a JSON-lines pool's lines, or a Parquet pool's table."""
        return original_rows(self.source, [self.problems[pid]["source_row"] for pid in self.problem_ids])

    def source_table(self):
        """A Parquet pool's original rows as a table, with --annotate's columns appended."""
        import pyarrow as pa

        table = self.source_rows()
        if self.annotate:
            for name in ANNOTATIONS:
                table = table.append_column(name, pa.array([e[name] for e in self.annotations]))
        return table


# Picked -> the bytes of the output file
Writer = Callable[[Picked], bytes]


@dataclass(frozen=True)
class Format:
    name: str
    help: str  # a few words, in --format's help ("verl Parquet, ..., or ids.")
    write: Writer
    # What binary data it writes ("Parquet"), which a terminal cannot show: written to a stdout
    # that is a terminal, it is refused before any work (check_output). None: text.
    binary: str | None = None


def _verl(p: Picked) -> bytes:
    if is_jsonl(p.source):
        return _parquet_bytes(_rows_table([json.loads(line) | p.extra(i) for i, line in enumerate(p.source_rows())]))
    return _parquet_bytes(p.source_table())


def _jsonl(p: Picked) -> bytes:
    if is_jsonl(p.source):
        return b"".join(_annotated_line(line, e, p.annotate) + b"\n" for line, e in zip(p.source_rows(), p.annotations))
    return "".join(json.dumps(r, default=str) + "\n" for r in p.source_table().to_pylist()).encode()


def _openrlhf(p: Picked) -> bytes:
    return "".join(
        json.dumps(
            {
                "input": json.loads(p.problems[pid]["prompt_messages_json"]),
                "label": p.problems[pid]["ground_truth"],
                **p.extra(i),
            }
        )
        + "\n"
        for i, pid in enumerate(p.problem_ids)
    ).encode()


def _ids(p: Picked) -> bytes:
    return "".join(pid + "\n" for pid in p.problem_ids).encode()


REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        Format("verl", "verl Parquet", _verl, binary="Parquet"),
        Format("jsonl", "the original rows as JSONL", _jsonl),
        Format("openrlhf", "OpenRLHF input/label", _openrlhf),
        Format("ids", "ids", _ids),
    )
}
FORMATS = tuple(REGISTRY)  # --format's choices, in --help's order


def write_selection(store, selection, *, fmt: str, out: str, annotate: bool, force: bool) -> int:
    """Emit the selected rows (a select.Selection), in rank order, in format `fmt`; returns the
    number written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in REGISTRY:
        raise GradselError(f"unknown --format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    manifest = store.read_manifest()
    to_stdout = out == "-"
    out_path = None if to_stdout else Path(out)
    check_out_path(out, force)
    source = _source_file(store, manifest)
    # Only the selected problems' rows become Python objects (a pool can hold millions).
    problems = pq.read_table(
        store.root / "rollouts/train/problems.parquet",
        columns=["problem_id", "source_row", "prompt_messages_json", "ground_truth"],
    )
    position = {pid: i for i, pid in enumerate(problems.column("problem_id").to_pylist())}
    picked = problems.take(pa.array([position[pid] for pid in selection.problem_ids], pa.int64())).to_pylist()
    annotations = [
        {"gradsel_rank": i + 1, "gradsel_score": float(s), "gradsel_mode": selection.config.mode}
        for i, s in enumerate(selection.scores)
    ]
    payload = REGISTRY[fmt].write(
        Picked(list(selection.problem_ids), {p["problem_id"]: p for p in picked}, source, annotations, annotate)
    )

    if to_stdout:
        write_stdout(payload)
    else:
        from gradsel.core.fsutil import atomic_write_bytes, atomic_write_json

        atomic_write_bytes(out_path, payload)
        atomic_write_json(
            out_path.with_name(out_path.name + ".gradsel.json"),
            {
                "mode": selection.config.mode,
                "config": asdict(selection.config),
                "format": fmt,
                "selected": len(selection.problem_ids),
                "eligible": selection.eligible,
                "store": str(store.root),
                "projector": manifest.get("projector"),
                "checkpoint": (manifest.get("snapshot") or {}).get("content_hash"),
                "problems_file": str(source),
            },
        )
    return len(selection.problem_ids)


def check_output(out: str, fmt: str, force: bool) -> None:
    """Fail before any work rather than after it: an existing file, or binary bytes bound for a
    terminal (the default --format verl with --out -, run without a pipe)."""
    import os

    check_out_path(out, force)
    binary = REGISTRY[fmt].binary
    if out == "-" and binary and os.isatty(console.data_out().fileno()):
        text = english_list(f.name for f in REGISTRY.values() if not f.binary)
        raise GradselError(
            f"refusing to write {binary} (--format {fmt}) to a terminal",
            f"pass --out FILE.{binary.lower()}, pipe the output, or pick a text format: --format {text}",
        )


def check_out_path(out: str, force: bool) -> None:
    """An --out that cannot be written is refused before any work."""
    if out == "-":
        return
    path = Path(out)
    if path.is_dir():
        raise GradselError(f"--out {out} is a directory", "give a file path, for example --out round1.parquet")
    if path.exists() and not force:
        raise GradselError(f"{out} exists", "pass --force to overwrite it, or choose another --out")


def write_stdout(payload: bytes) -> None:
    """Data to stdout. A reader that closed the pipe early (`| head`) took what it wanted: not an
    error, so the rest is dropped quietly and the caller goes on (a selection is still recorded)."""
    import os

    stream = console.data_out()
    try:
        stream.flush()
        stream.buffer.write(payload)
        stream.buffer.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null, so the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _rows_table(rows: list[dict]):
    """JSON rows as an Arrow table; a field whose type differs between rows is named, not a traceback."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        field, kinds = _mixed_field(rows) or ("a field", "several types")
        raise GradselError(
            f"{field} holds {kinds} across the selected rows; Parquet needs one type per column",
            "pass --format jsonl to emit the lines unchanged, or give the field one type",
        ) from exc


def _mixed_field(rows: list[dict], prefix: str = "") -> tuple[str, str] | None:
    """The first (dotted) field whose non-null values have more than one JSON type."""
    kinds: dict[str, set[str]] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                kinds.setdefault(key, set()).add("number" if type(value) in (int, float) else type(value).__name__)
    for key, found in kinds.items():
        if len(found) > 1:
            return prefix + key, " and ".join(sorted(found))
        if found == {"dict"}:
            nested = _mixed_field([row[key] for row in rows if isinstance(row.get(key), dict)], f"{prefix}{key}.")
            if nested:
                return nested
    return None


def _annotated_line(line: bytes, extra: dict, annotate: bool) -> bytes:
    if not annotate:
        return line  # byte for byte as it came in
    return json.dumps(json.loads(line) | extra).encode()


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _source_file(store, manifest: dict) -> Path:
    """The candidates' original file, checked against the hash recorded when it was read."""
    from gradsel.core.fsutil import file_sha256

    info = (manifest.get("rollouts") or {}).get("train")
    if not info:
        raise GradselError(f"store {store.root} has no candidate rollouts", "run `gradsel score` first")
    path = Path(info["problems_file"])
    if not path.is_file():
        raise GradselError(f"the pool file {path} is gone", "restore it: selection emits its original rows")
    if file_sha256(path) != info["problems_sha256"]:
        raise GradselError(
            f"the pool file {path} changed since it was scored",
            "restore the scored version, or rescore into a new store",
        )
    return path
