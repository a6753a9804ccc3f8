"""`python -m cli`: the `clso` command without its console script."""

from cli import app

app(prog_name="clso")
