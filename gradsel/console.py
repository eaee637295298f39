"""Logs and progress on stderr through rich; stdout is reserved for data.

rich honours NO_COLOR (and a non-terminal stderr) on its own, so nothing here checks it.
"""

from __future__ import annotations

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

    for name, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("TORCH_CPP_LOG_LEVEL", "ERROR"), ("TORCH_LOGS", "-torch"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TOKENIZERS_PARALLELISM", "false"),
                        ("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")):
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


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {message}")


def progress() -> Progress:
    """A progress bar on stderr; silent under --quiet. Tasks carry a free-text `rate` field."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
        console=stderr, disable=_verbosity == 0, transient=False,
    )


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
