"""What the surrogate and evolve stages share: the model under search, its fixed fitness batch,
and the sampling of genomes to teach the surrogate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clso import ClsoError
from clso.context import derive_seed
from clso.data.tokens import EvalBatch, TokenData
from clso.model.crystalline import CrystallineGPT2, ModelConfig, genome_length
from clso.model.library import BUCKETS, Library
from clso.search import ga
from clso.search.evaluate import FitnessEvaluator


@dataclass
class Search:
    config: ModelConfig
    library: Library
    model: CrystallineGPT2
    batch: EvalBatch
    evaluator: FitnessEvaluator
    data: TokenData

    @property
    def genome_length(self) -> int:
        return genome_length(self.config)

    @property
    def precision(self) -> str:
        return self.evaluator.precision

    @property
    def gene_buckets(self) -> tuple[int, ...]:
        return tuple(k % len(BUCKETS) for k in range(self.genome_length))


def build_search(data_dir: str | Path, library_dir: str | Path, model, *, fitness_batch_size: int, seed: int,
                 device, mode: str = "pure", precision: str = "fp32") -> Search:
    """The crystalline GPT-2 of `model` (ModelParams) on the prepared data and the built library;
    its forward passes run in `precision` (fp32 or bf16)."""
    data = TokenData.open(data_dir)
    library = Library.load(library_dir)
    if library.shapes["c_attn"][0] != model.n_embd:
        raise ClsoError(f"{library_dir}: library built for n_embd {library.shapes['c_attn'][0]}, "
                        f"model.n_embd is {model.n_embd}; run `dvc repro library`")
    config = ModelConfig.from_params(model, data.vocab_size)
    crystal = CrystallineGPT2(config, library, mode=mode, seed=seed).to(device)
    train = data.tokens("train")
    if len(train) <= model.block_size + 1:
        raise ClsoError(f"the train split has {len(train)} tokens, too few for model.block_size "
                        f"{model.block_size}; lower it or use more data")
    batch = EvalBatch.sample(train, fitness_batch_size, model.block_size, derive_seed(seed, "fitness"), device)
    return Search(config, crystal.library, crystal, batch, FitnessEvaluator(crystal, batch, precision=precision), data)


def sample_for_surrogate(search: Search, n: int, mutant_fraction: float, rng: np.random.Generator,
                         on_progress=None, rounds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n truly evaluated genomes: random ones, then mutants of the best found so far, so the data
    is not all poor. Returns distinct genomes, their losses and their families: a random genome starts
    one (its index among the random ones), a mutant joins its parent's."""
    size, length = search.library.size, search.genome_length
    ga_config = ga.GAConfig(population=2, genome_length=length, library_size=size, elite=0)
    n_random = max(1, n - int(round(n * mutant_fraction)))
    genomes: dict[tuple[int, ...], float] = {}
    family: dict[tuple[int, ...], int] = {}

    def evaluate(batch: np.ndarray, families) -> None:
        new = {}
        for g, f in zip(map(tuple, batch.tolist()), families):
            if g not in genomes and g not in new and len(genomes) + len(new) < n:
                new[g] = f
        if new:
            genomes.update(zip(new, search.evaluator(np.array(list(new))).tolist()))
            family.update(new)
            if on_progress:
                on_progress(len(new))

    evaluate(ga.random_genomes(n_random, ga_config, rng), range(n_random))
    stalls = 0
    while len(genomes) < n and stalls < 100:
        before = len(genomes)
        ranked = sorted(genomes, key=genomes.get)[:max(1, len(genomes) // 10)]
        want = min(n - len(genomes), max(1, (n - n_random) // rounds))
        parents = [ranked[i] for i in rng.integers(0, len(ranked), size=want)]
        rate = 2.0 / length  # about two genes changed: near the best, not on top of it
        evaluate(np.array([ga.mutate(np.array(p), rate, size, rng) for p in parents]), [family[p] for p in parents])
        stalls = stalls + 1 if len(genomes) == before else 0
    keys = list(genomes)
    return (np.array(keys, dtype=np.int64), np.array([genomes[k] for k in keys]),
            np.array([family[k] for k in keys], dtype=np.int64))


def split_by_family(families: np.ndarray, n_hold: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(held, kept) indices: whole families, in random order, go to the held side while they fit in
    `n_hold`, so no genome is held out while its parent or a sibling trains (near-duplicates would
    flatter the held-out score)."""
    ids, sizes = np.unique(families, return_counts=True)
    size_of = dict(zip(ids.tolist(), sizes.tolist()))
    held_ids, count = set(), 0
    for f in rng.permutation(ids).tolist():
        if count + size_of[f] <= n_hold:
            held_ids.add(f)
            count += size_of[f]
    held = np.isin(families, list(held_ids))
    return np.flatnonzero(held), np.flatnonzero(~held)
