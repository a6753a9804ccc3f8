"""`clso fuzz`: differential fuzzing of the two .crystal readers (Python and C) with atheris (a tool, not a DVC stage)."""

import json
import tempfile
from pathlib import Path

import typer

from clso import ClsoError
from stages.common import app, one_line_errors


@app.command("fuzz")
@one_line_errors("fuzz")
def fuzz(
    runs: int = typer.Option(100_000, help="inputs to try"),
    seed: int = typer.Option(0, help="the fuzzer's seed"),
    workdir: Path = typer.Option(None, help="where corpus, libraries and crash-* files go (default: a temp folder)"),
    cc: str = typer.Option("cc", help="C compiler for the fuzzed library and the sanitized replay"),
) -> None:
    """Fuzz the .crystal readers: each input goes to the Python reader and to the C loader, which
    must both reject it cleanly or both accept it; then the grown corpus is replayed through the C
    loader under AddressSanitizer and UBSan. Prints a JSON summary; exit 1 on any finding."""
    from clso.export.fuzz import run

    folder = workdir or Path(tempfile.mkdtemp(prefix="clso-fuzz-"))
    result = run(folder, runs=runs, seed=seed, cc=cc)
    print(json.dumps({"workdir": str(folder), **result}, indent=2))
    if not result["ok"]:
        raise ClsoError(f"the fuzzer found a problem; inputs are in {folder} (crash-*), see log_tail above")
