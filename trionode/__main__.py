"""`python -m trionode`: the installed `trionode` script's command (`cli_early.main`: a
`context join` is sent before the CLI loads)."""

from trionode.cli_early import main

main()
