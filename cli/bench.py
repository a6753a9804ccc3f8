"""`clso bench …`: benchmarks that print JSON, each ratio measured side by side in one run (a tool, not a DVC stage)."""

import json
from pathlib import Path

import typer

from clso import ClsoError
from clso.context import resolve_device, resolve_precision
from stages.common import app, one_line_errors

bench = typer.Typer(no_args_is_help=True, help="Benchmarks: JSON on stdout, fast path against plain path.")
app.add_typer(bench, name="bench")

PRESET_OPTION = typer.Option("default", help="shapes: default (params.yaml's CPU-sized model) or protocol "
                                             "(GPT-2 small: 12 × 768, 12 heads, 512 tokens, batch 16)")
DEVICE_OPTION = typer.Option("cpu", help="cpu, cuda or auto")
THREADS_OPTION = typer.Option(0, help="torch CPU threads; 0 keeps torch's default")


def _shapes(preset: str, **given) -> dict:
    """The preset's shapes, with every option the user gave on top."""
    from clso.bench import PRESETS

    if preset not in PRESETS:
        raise ClsoError(f"--preset {preset}: unknown; valid: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}


def _threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@bench.command("eval")
@one_line_errors("bench eval")
def eval_(
    preset: str = PRESET_OPTION,
    n_embd: int = typer.Option(None, help="model width (default: the preset's)"),
    n_layer: int = typer.Option(None, help="transformer blocks"),
    n_head: int = typer.Option(None, help="attention heads"),
    population: int = typer.Option(None, help="genomes per population"),
    batch_size: int = typer.Option(None, help="sequences in the fitness batch (default: the preset's)"),
    block_size: int = typer.Option(None, help="tokens per sequence"),
    library_size: int = typer.Option(None, help="matrices per bucket"),
    vocab_size: int = typer.Option(None, help="vocabulary of the model"),
    warmup_generations: int = typer.Option(10, help="GA generations before the measured one"),
    repeats: int = typer.Option(3, help="interleaved repeats of each path; medians are reported"),
    precision: str = typer.Option("auto", help="of the fast path: auto (bf16 on CUDA, fp32 on a CPU), fp32 or bf16"),
    seed: int = typer.Option(0),
    device: str = DEVICE_OPTION,
    threads: int = THREADS_OPTION,
    workers: int = typer.Option(0, help="> 0: the fast path on this many Ray actors against one actor "
                                        '(evolve.workers; pip install -e ".[ray]"): one GPU each with --device '
                                        "cuda, one CPU thread each with --device cpu"),
    address: str = typer.Option("", help="with --workers: the Ray cluster to join; empty: a local one"),
) -> None:
    """Population evaluation: genomes/s of the plain loop (fp32) and of the fast path (in --precision),
    their ratio, the fast path's TFLOP/s, FLOPs per genome dense and factored, the largest loss
    difference and rank correlation of the two; and the fast path in bf16 against fp32 (genomes/s,
    TFLOP/s, Spearman rank correlation of their losses). With --workers N: genomes/s on N Ray actors
    against one, the speed-up and the scaling efficiency (speed-up / N)."""
    from clso.bench import bench_eval, bench_eval_workers

    _threads(threads)
    shapes = _shapes(preset, n_embd=n_embd, n_layer=n_layer, n_head=n_head, population=population,
                     eval_batch_size=batch_size, block_size=block_size, library_size=library_size,
                     vocab_size=vocab_size)
    if precision not in ("auto", "fp32", "bf16"):
        raise ClsoError(f"--precision {precision}: valid: auto, fp32, bf16")
    where = resolve_device(device)
    if workers < 0:
        raise ClsoError(f"--workers {workers}: must be 0 (in process) or more")
    if workers and threads:
        raise ClsoError("--threads applies in process; with --workers each actor uses one thread")
    if workers:
        result = bench_eval_workers(workers, **{k: shapes[k] for k in ("n_embd", "n_layer", "n_head", "population",
                                                                      "block_size", "library_size", "vocab_size")},
                                    batch_size=shapes["eval_batch_size"], repeats=repeats, seed=seed,
                                    precision=resolve_precision(precision, where),
                                    address=address or None, device=where)
        print(json.dumps({"preset": preset, **result}, indent=2))
        return
    result = bench_eval(**{k: shapes[k] for k in ("n_embd", "n_layer", "n_head", "population", "block_size",
                                                  "library_size", "vocab_size")},
                        batch_size=shapes["eval_batch_size"], warmup_generations=warmup_generations, repeats=repeats,
                        seed=seed, device=where, precision=resolve_precision(precision, where))
    print(json.dumps({"preset": preset, **result}, indent=2))


@bench.command("es")
@one_line_errors("bench es")
def es(
    preset: str = PRESET_OPTION,
    pairs: int = typer.Option(16, help="antithetic pairs: a population of 2 × pairs"),
    rank: int = typer.Option(1, help="rank of each matrix's perturbation"),
    repeats: int = typer.Option(3, help="interleaved repeats of each path; medians are reported"),
    seed: int = typer.Option(0),
    device: str = DEVICE_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """The arena's ES member evaluation: members/s of the low-rank population forward (no perturbed
    matrix formed) against forming each member's W + E and running it, on the preset's fitness batch;
    their ratio and the largest loss difference."""
    from clso.bench import bench_es

    _threads(threads)
    shapes = _shapes(preset)
    result = bench_es(**{k: shapes[k] for k in ("n_embd", "n_layer", "n_head", "block_size", "vocab_size")},
                      batch_size=shapes["eval_batch_size"], pairs=pairs, rank=rank, repeats=repeats, seed=seed,
                      device=resolve_device(device))
    print(json.dumps({"preset": preset, **result}, indent=2))


@bench.command("train")
@one_line_errors("bench train")
def train(
    preset: str = PRESET_OPTION,
    n_embd: int = typer.Option(None, help="model width (default: the preset's)"),
    n_layer: int = typer.Option(None, help="transformer blocks"),
    n_head: int = typer.Option(None, help="attention heads"),
    batch_size: int = typer.Option(None, help="sequences per step (default: the preset's baseline batch)"),
    block_size: int = typer.Option(None, help="tokens per sequence"),
    vocab_size: int = typer.Option(None, help="vocabulary of the model"),
    micro_batch_size: int = typer.Option(0, help="sequences per forward/backward (gradient accumulation); 0 = all"),
    settings: str = typer.Option("", help="comma-separated settings, the first the reference (default: fp32-eager, "
                                          "fp32-sdpa, tf32-sdpa, bf16-sdpa-fused, bf16-sdpa-fused-compile on CUDA; "
                                          "fp32-eager, fp32-sdpa, bf16-sdpa on a CPU)"),
    steps: int = typer.Option(50, help="timed steps per round (NVML's counter wants rounds of a second or more)"),
    warmup_steps: int = typer.Option(3, help="untimed steps first (compilation happens here)"),
    repeats: int = typer.Option(3, help="rounds through the settings; medians are reported"),
    seed: int = typer.Option(0),
    device: str = DEVICE_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """The baseline's AdamW step in each precision / attention / optimizer / compile setting: ms/step,
    tokens/s, achieved TFLOP/s, MFU (where the GPU's bf16 peak is known), joules per step (NVML on an
    NVIDIA GPU; the method is recorded) and each against the reference setting."""
    from clso.bench import TRAIN_SETTINGS, bench_train

    _threads(threads)
    shapes = _shapes(preset, n_embd=n_embd, n_layer=n_layer, n_head=n_head, train_batch_size=batch_size,
                     block_size=block_size, vocab_size=vocab_size)
    chosen = tuple(s.strip() for s in settings.split(",") if s.strip()) or None
    for s in chosen or ():
        if s not in TRAIN_SETTINGS:
            raise ClsoError(f"--settings: {s!r} is unknown; valid: {', '.join(TRAIN_SETTINGS)}")
    if micro_batch_size and shapes["train_batch_size"] % micro_batch_size:
        raise ClsoError(f"--micro-batch-size {micro_batch_size} does not divide the batch of {shapes['train_batch_size']}")
    result = bench_train(**{k: shapes[k] for k in ("n_embd", "n_layer", "n_head", "block_size", "vocab_size")},
                         batch_size=shapes["train_batch_size"],
                         micro_batch_size=micro_batch_size, settings=chosen, steps=steps, warmup_steps=warmup_steps,
                         repeats=repeats, seed=seed, device=resolve_device(device))
    print(json.dumps({"preset": preset, **result}, indent=2))
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

    from clso.export.compile import bench_runtime

    for path, what in ((model, "model file"), (binary, "runtime")):
        if not path.is_file():
            raise ClsoError(f"{path}: {what} not found; run `dvc repro compile` first")
    torch.set_num_threads(threads)
    print(json.dumps({"benchmark": "runtime", **bench_runtime(binary, model, new_tokens=tokens, repeats=repeats,
                                                              seed=seed)}, indent=2))
