"""`clso bench …`: benchmarks that print JSON, each ratio measured side by side in one run."""

import json
from pathlib import Path

import typer

from clso import ClsoError
from clso.bench import bench_eval
from clso.context import resolve_device
from stages.common import app, one_line_errors

bench = typer.Typer(no_args_is_help=True, help="Benchmarks: JSON on stdout, fast path against plain path.")
app.add_typer(bench, name="bench")


@bench.command("eval")
def eval_(
    n_embd: int = typer.Option(128, help="model width"),
    n_layer: int = typer.Option(2, help="transformer blocks"),
    n_head: int = typer.Option(4, help="attention heads"),
    population: int = typer.Option(64, help="genomes per population"),
    batch_size: int = typer.Option(8, help="sequences in the evaluation batch"),
    block_size: int = typer.Option(128, help="tokens per sequence"),
    library_size: int = typer.Option(256, help="matrices per bucket"),
    vocab_size: int = typer.Option(4096, help="vocabulary of the model"),
    warmup_generations: int = typer.Option(10, help="GA generations before the measured one"),
    repeats: int = typer.Option(3, help="interleaved repeats of each path; medians are reported"),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu, cuda or auto"),
    threads: int = typer.Option(0, help="torch CPU threads; 0 keeps torch's default"),
) -> None:
    """Population evaluation: genomes/s of the plain loop and of the fast path, their ratio, FLOPs
    per genome dense and factored, and the largest loss difference between the two."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    result = bench_eval(n_embd=n_embd, n_layer=n_layer, n_head=n_head, population=population,
                        batch_size=batch_size, block_size=block_size, library_size=library_size,
                        vocab_size=vocab_size, warmup_generations=warmup_generations, repeats=repeats,
                        seed=seed, device=resolve_device(device))
    print(json.dumps(result, indent=2))


@bench.command("runtime")
@one_line_errors("bench runtime")
def runtime(
    model: Path = typer.Option(Path("build/clso-mixed8.crystal"), help="a .crystal file (`dvc repro compile` writes them)"),
    binary: Path = typer.Option(Path("build/crystal"), help="the C runtime (`dvc repro compile` builds it)"),
    tokens: int = typer.Option(100, help="tokens of the generated sequence (at most the context - 1)"),
    repeats: int = typer.Option(3, help="interleaved runs of each; medians are reported"),
    threads: int = typer.Option(2, help="torch CPU threads (the runtime uses one)"),
    seed: int = typer.Option(0),
) -> None:
    """Single-sequence generation: tokens/s of the C runtime and of PyTorch eager (transformers'
    GPT-2 with the file's weights and a KV cache), and their ratio."""
    import torch

    from clso.compile import bench_runtime

    for path, what in ((model, "model file"), (binary, "runtime")):
        if not path.is_file():
            raise ClsoError(f"{path}: {what} not found; run `dvc repro compile` first")
    torch.set_num_threads(threads)
    print(json.dumps({"benchmark": "runtime", **bench_runtime(binary, model, new_tokens=tokens, repeats=repeats,
                                                              seed=seed)}, indent=2))
