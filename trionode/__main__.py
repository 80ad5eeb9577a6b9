from trionode.cli import run

run()
