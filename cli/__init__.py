"""The `clso` command: every DVC stage (stages/) and every tool (bench, fuzz, scaling) as a subcommand
of one typer app. Stages run through `dvc repro`; bench and fuzz print JSON; scaling queues and reads
the size sweep's DVC experiments."""

import importlib

from stages.common import app

# each import registers its commands, in this order in `clso --help`: the stages as the pipeline runs
# them, then the tools
COMMANDS = ("stages.prepare", "stages.baseline", "stages.library", "stages.surrogate", "stages.evolve", "stages.arena",
            "stages.field", "stages.spread", "stages.sweep", "stages.compile", "stages.transfer", "stages.compare",
            "cli.bench", "cli.fuzz", "cli.scaling")
for module in COMMANDS:
    importlib.import_module(module)

__all__ = ["app"]
