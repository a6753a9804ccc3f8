"""The `clso` command: every stage (and benchmark) as a subcommand of one typer app."""

import stages.prepare  # noqa: F401  (registers its command)
from stages.common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
