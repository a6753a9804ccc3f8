"""Benchmarks: the fast paths against the plain ones, measured side by side in one run."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from clso import ga
from clso.evaluate import EvalBatch, FitnessEvaluator, plain_losses, population_losses
from clso.flops import forward_flops
from clso.library import Library
from clso.model import CrystallineGPT2, ModelConfig, genome_length

DEFAULT_SHARES = {"block_diag": 0.25, "ternary_lowrank": 0.45, "structured_sparse": 0.25, "dense_quantized": 0.05}


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _side_by_side(genomes: np.ndarray, plain, fast, repeats: int) -> dict:
    """Interleaved repeats of both paths on the same genomes; medians, so one noisy run cannot decide."""
    plain_s, fast_s = [], []
    for _ in range(repeats):
        t, plain_out = _timed(lambda: plain(genomes))
        plain_s.append(t)
        t, fast_out = _timed(fast)
        fast_s.append(t)
    diff = np.abs(fast_out - plain_out)
    plain_t, fast_t = statistics.median(plain_s), statistics.median(fast_s)
    return {
        "genomes": len(genomes),
        "plain_genomes_per_s": round(len(genomes) / plain_t, 3),
        "fast_genomes_per_s": round(len(genomes) / fast_t, 3),
        "ratio": round(plain_t / fast_t, 3),
        "plain_s": [round(t, 4) for t in plain_s], "fast_s": [round(t, 4) for t in fast_s],
        "max_abs_loss_diff": float(diff.max()),
        "max_rel_loss_diff": float((diff / np.abs(plain_out)).max()),
    }


def bench_eval(*, n_embd=128, n_layer=2, n_head=4, population=64, batch_size=8, block_size=128,
               library_size=256, vocab_size=4096, warmup_generations=10, repeats=3, seed=0,
               device="cpu") -> dict:
    """Population evaluation: plain loop (the seed's way) against `population_losses`.

    (a) `distinct_random`: P distinct random genomes, no cache: any gain is work really saved.
    (b) `ga_generation`: the children that elitism, tournament selection, crossover and
        mutation make from a population the GA has already evaluated for
        `warmup_generations` generations; the fast path keeps the fitness cache a real run has.
    Tokens are uniform random ids: speed and agreement do not depend on their content.
    """
    torch.manual_seed(seed)
    library, _ = Library.generate(seed, n_embd, size=library_size, shares=DEFAULT_SHARES)
    config = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size)
    model = CrystallineGPT2(config, library, seed=seed).to(device).eval()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=batch_size * block_size * 16, dtype=np.int64)
    batch = EvalBatch.sample(tokens, batch_size, block_size, seed, device)
    n_genes = genome_length(config)
    dense_flops = forward_flops(config.gpt2(), block_size, batch_size)

    def plain(genomes):
        return plain_losses(model, genomes, batch)

    def flops_of(genomes):
        return {"flops_per_genome_dense": dense_flops,
                "flops_per_genome_factored": int(np.mean([model.genome_flops(g, block_size, batch_size)
                                                          for g in genomes]))}

    # (a) distinct random genomes
    distinct = np.unique(rng.integers(0, library_size, size=(population, n_genes)), axis=0)
    while len(distinct) < population:
        extra = rng.integers(0, library_size, size=(population - len(distinct), n_genes))
        distinct = np.unique(np.concatenate([distinct, extra]), axis=0)
    distinct = rng.permutation(distinct)
    part_a = _side_by_side(distinct, plain, lambda: population_losses(model, distinct, batch), repeats)
    part_a.update(flops_of(distinct))

    # (b) one real GA generation
    cfg = ga.GAConfig(population=population, genome_length=n_genes, library_size=library_size)
    evaluator = FitnessEvaluator(model, batch)
    state = ga.init(cfg, seed)
    state = ga.tell(cfg, state, state.population, evaluator(state.population))
    for _ in range(warmup_generations):
        children, state = ga.ask(cfg, state)
        state = ga.tell(cfg, state, children, evaluator(children))
    children, state = ga.ask(cfg, state)
    warm_cache = dict(evaluator.cache)

    def fast_generation():
        evaluator.cache = dict(warm_cache)
        return evaluator(children)

    keys = {tuple(c) for c in children.tolist()}
    part_b = _side_by_side(children, plain, fast_generation, repeats)
    part_b.update(flops_of(children))
    part_b.update({"generation": state.generation + 1, "distinct_children": len(keys),
                   "already_evaluated": sum(k in warm_cache for k in keys),
                   "evaluated_by_fast_path": sum(k not in warm_cache for k in keys)})
    return {
        "benchmark": "eval", "device": str(device), "threads": torch.get_num_threads(),
        "config": {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "population": population,
                   "batch_size": batch_size, "block_size": block_size, "library_size": library_size,
                   "vocab_size": vocab_size, "genome_length": n_genes, "repeats": repeats, "seed": seed},
        "distinct_random": part_a,
        "ga_generation": part_b,
    }
