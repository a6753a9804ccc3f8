"""The `clso` command: every DVC stage (stages/) and every tool (bench, fuzz) as a subcommand of one
typer app. Stages run through `dvc repro`; the tools print JSON."""

import cli.bench  # noqa: F401  (each import registers its commands)
import cli.fuzz  # noqa: F401
import stages.baseline  # noqa: F401
import stages.compare  # noqa: F401
import stages.compile  # noqa: F401
import stages.evolve  # noqa: F401
import stages.field  # noqa: F401
import stages.library  # noqa: F401
import stages.prepare  # noqa: F401
import stages.surrogate  # noqa: F401
import stages.transfer  # noqa: F401
from stages.common import app

__all__ = ["app"]
