"""What every stage command shares: one typer app, the --params option, one-line errors."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import typer

from clso import ClsoError
from clso.params import section_help
from clso.record import Record
from stages.closure import ROOT, code_files
from stages.paths import Contestant

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    help="CLSO: evolve GPT-2 weights from a library of crystalline matrices, and compare with "
         "AdamW. Each stage command is one DVC stage: run them through `dvc repro`, with every "
         "hyperparameter in params.yaml. bench and fuzz are tools that print JSON.",
)



@app.callback()
def _group() -> None:
    # a callback keeps `clso` a group of subcommands even while it has only one
    pass


PARAMS_OPTION = typer.Option("params.yaml", "--params", help="the params file (every key is checked)")
MODE_OPTION = typer.Option("pure", "--mode", help="pure or hybrid (one of params.yaml's grid lists)")
SEED_OPTION = typer.Option(None, "--seed", help="search seed (one of grid.seeds); default base.seed")


def stage(name: str, sections: tuple[str, ...]):
    """Register a stage command; its --help lists the params.yaml sections it reads."""

    def register(fn):
        # blank lines keep click from folding the key list into one paragraph
        epilog = "\n\n".join(section_help(s).replace("\n", "\n\n") for s in sections)
        run = one_line_errors(name)(fn)
        app.command(name, epilog=epilog)(run)
        return run

    return register


def one_line_errors(name: str):
    """A ClsoError or Ctrl-C ends the command with one line on stderr and its exit status."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ClsoError as e:
                print(f"clso {name}: error: {e}", file=sys.stderr)
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                print(f"clso {name}: interrupted; outputs were left as they were", file=sys.stderr)
                raise typer.Exit(130) from None

        return run

    return wrap


def run_alone(name: str) -> None:
    """`python -m stages.NAME`, as dvc.yaml calls it, runs the command NAME."""
    app(args=[name, *sys.argv[1:]], prog_name=f"python -m stages.{name}")


def fingerprint(settings: dict, files, stage_module: str) -> str:
    """What a checkpoint must match to be resumed: the settings (params sections and the like), the
    input files, and the code the stage runs (its import closure, as dvc.yaml's deps list it) — a
    fix must not be mixed into a run the old code began."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    for f in code_files(stage_module):
        h.update(f.encode() + b"\0" + (ROOT / f).read_bytes())
    return h.hexdigest()


def shared_costs(details: dict[str, dict]) -> dict[str, dict]:
    """The costs a record may name in `charged_with`, each recorded once by the stage that spent it."""
    try:
        return {"library": details["library"]["generation"], "surrogate_evaluation": details["surrogate"]["evaluation"],
                "surrogate_training": details["surrogate"]["training"],
                "baseline_training": Record.load(Contestant("baseline").record).costs["training"]}
    except KeyError as e:
        raise ClsoError(f"metrics/detail/: no {e} where a shared cost should be (written by another version?); "
                        "re-create it with `dvc repro -f library surrogate baseline`") from None
