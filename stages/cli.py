"""The `clso` command: every stage (and benchmark) as a subcommand of one typer app."""

import stages.baseline  # noqa: F401  (each import registers its commands)
import stages.bench  # noqa: F401
import stages.compare  # noqa: F401
import stages.compile  # noqa: F401
import stages.evolve  # noqa: F401
import stages.field  # noqa: F401
import stages.fuzz  # noqa: F401
import stages.library  # noqa: F401
import stages.prepare  # noqa: F401
import stages.surrogate  # noqa: F401
import stages.transfer  # noqa: F401
from stages.common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
