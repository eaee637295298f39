"""Logs and progress on stderr through rich; stdout is reserved for data.

rich honours NO_COLOR (and a non-terminal stderr) on its own, so nothing here checks it. Progress
is a bar on a terminal, and plain lines in a log (PlainProgress).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True, highlight=False)
_verbosity = 1  # 0 quiet, 1 normal, 2 verbose


def set_verbosity(*, quiet: bool = False, verbose: bool = False) -> None:
    global _verbosity
    _verbosity = 0 if quiet else 2 if verbose else 1
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Silence vLLM's, transformers' and torch's own logs and warnings, here and in the worker
    processes they start (which inherit the environment): gradsel reports progress itself, and
    `--verbose` brings them back. A variable the user has set is left as it is."""
    import os
    import warnings

    for name, value in (
        ("VLLM_LOGGING_LEVEL", "ERROR"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TORCH_CPP_LOG_LEVEL", "ERROR"),
        ("TORCH_LOGS", "-torch"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning"),
    ):
        os.environ.setdefault(name, value)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def is_verbose() -> bool:
    return _verbosity == 2


def info(message: str) -> None:
    if _verbosity >= 1:
        stderr.print(message)


def debug(message: str) -> None:
    if _verbosity >= 2:
        stderr.print(f"[dim]{message}[/dim]")


_WARNED: set[str] = set()  # every warning this process printed (warn_once skips a repeat)


def warn(message: str) -> None:
    """`warning:` and the message on one line however long (a log is grepped), the message taken
    literally: a quoted response's `[...]` is text, not rich markup."""
    from rich.markup import escape

    _WARNED.add(message)
    stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def warn_once(message: str) -> None:
    """warn, unless this process printed the same warning already: a recipe that passes the same
    stage several times (the demo, refresh) says a finding about the data once."""
    if message not in _WARNED:
        warn(message)


class BarProgress(Progress):
    """rich's bar, with the one call PlainProgress adds (a bar shows every step anyway)."""

    def shard_done(self, task) -> None:
        pass


def progress() -> "BarProgress | PlainProgress":
    """Progress on stderr: a bar on a terminal, plain lines where stderr is a file or a pipe
    (nohup, Slurm, Ray), where a bar is never drawn; silent under --quiet. Tasks carry a free-text
    `rate` field; a stage calls `shard_done(task)` after each of its shards."""
    if _verbosity == 0 or stderr.is_terminal or stderr.is_jupyter:
        return BarProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=stderr,
            disable=_verbosity == 0,
            transient=False,
        )
    return PlainProgress(lambda line: stderr.print(line, markup=False, highlight=False, soft_wrap=True))


PLAIN_INTERVAL_S = 30.0  # a log gets a progress line at most this often, besides shard ends


@dataclass
class _PlainTask:
    description: str
    total: float | None
    rate: str
    started: float
    last_line: float  # clock time of the task's last line (its start before any)
    completed: float = 0
    printed: float | None = None  # `completed` when the last line was printed


class PlainProgress:
    """Progress for a log: `stage: done/total, rate, elapsed` lines, one at the end of each shard
    (`shard_done`), one when a task completes, and otherwise at most one every `interval` seconds.
    The calls are rich Progress's that the stages use (add_task, update, advance), so a stage
    drives a bar and a log alike. `clock` and `write` are injectable (tests)."""

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = PLAIN_INTERVAL_S,
    ) -> None:
        self.write, self.clock, self.interval = write, clock, interval
        self.tasks: list[_PlainTask] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, rate: str = "") -> int:
        now = self.clock()
        self.tasks.append(_PlainTask(description, total, rate, started=now, last_line=now))
        return len(self.tasks) - 1

    def update(self, task: int, *, advance: float = 0, rate: str | None = None) -> None:
        t = self.tasks[task]
        t.completed += advance
        if rate is not None:
            t.rate = rate
        now = self.clock()
        finished = t.total is not None and t.completed >= t.total
        if now - t.last_line >= self.interval or (finished and t.printed != t.completed):
            self._line(t, now)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def shard_done(self, task: int) -> None:
        t = self.tasks[task]
        if t.printed != t.completed:
            self._line(t, self.clock())

    def _line(self, t: _PlainTask, now: float) -> None:
        elapsed = now - t.started
        done = f"{t.completed:g}/{t.total:g}" if t.total is not None else f"{t.completed:g}"
        rate = t.rate or (f"{t.completed / elapsed:.1f}/s" if elapsed > 0 else "")
        parts = [done, rate, f"{timedelta(seconds=int(elapsed))} elapsed"]
        self.write(f"{t.description}: " + ", ".join(p for p in parts if p))
        t.last_line, t.printed = now, t.completed


_data_out = None


def protect_stdout():
    """Point fd 1 at stderr for the rest of the process and return a stream for data.

    Engines and their worker processes (vLLM logs, C++ libraries) may print to stdout; after
    this call that text lands on stderr, and only what is written to the returned stream
    reaches stdout, so `gradsel ... | trainer` stays clean.
    """
    import os
    import sys

    global _data_out
    if _data_out is None:
        sys.stdout.flush()
        _data_out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
    return _data_out


def data_out():
    import sys

    return _data_out or sys.stdout
