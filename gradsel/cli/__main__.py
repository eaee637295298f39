"""`python -m gradsel.cli`: the same entry point as the `gradsel` command."""

from gradsel.cli.app import main

main()
