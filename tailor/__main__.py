"""`python -m tailor`: the same as the `tailor` command (used by `torchrun -m tailor train …`)."""

from tailor.cli import app

app()
