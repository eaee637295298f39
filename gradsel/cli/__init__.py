"""Floor 10, the top: the typer app. Run as `gradsel` or `python -m gradsel.cli`."""
