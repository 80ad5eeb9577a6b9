"""`python -m trionode`: a `context join` is sent before the CLI loads (cli_early.py)."""

import sys

from trionode.cli_early import send

send(sys.argv[1:])

from trionode.cli import run  # noqa: E402 - after the early join went out

run()
