"""docs/cli.md is generated from the CLI (scripts/cli_docs.py), and the commands that select take
the same selection options."""

import importlib.util

import typer

from gradsel.cli.app import app
from gradsel.core import choices
from gradsel.selection.formats import FORMATS
from gradsel.selection.modes import MODES
from helpers import ROOT, run_cli


def _command(name):
    return typer.main.get_command(app).commands[name]


def test_docs_cli_md_is_generated_from_the_cli():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs.render(), (
        "docs/cli.md is stale: run `.venv/bin/python scripts/cli_docs.py` and commit it"
    )


def test_refresh_and_report_take_every_selection_option_select_takes():
    def selection(name):
        return {p.name for p in _command(name).params if getattr(p, "rich_help_panel", None) == "Selection"}

    assert len(selection("select")) == 14
    assert selection("refresh") == selection("report") == selection("select")


def test_choice_options_list_their_choices_in_help():
    for command, option, values in (
        ("select", "mode", MODES),
        ("select", "format", FORMATS),
        ("demo-data", "regime", choices.REGIMES),
        ("score", "executor", choices.EXECUTORS),
        ("score", "loss-agg", choices.LOSS_AGGS),
        ("score", "alignment", choices.ALIGNMENTS),
    ):
        proc = run_cli(command, "--help", env={"COLUMNS": "400"})
        assert "|".join(values) in proc.stdout, (command, option)
