"""A standard discrete optimizer on CLSO's genome: nevergrad's NGOpt, through ask and tell.

The genome is `ng.p.Choice(range(M), repetitions=N, deterministic=True)`: N genes, each an index
into its bucket's M matrices. NGOpt is nevergrad's own recommendation, the optimizer a researcher
reaches for first; it picks an algorithm by the problem's shape, budget and parallelism (for 8 genes
of 256, a budget of about a thousand and a dozen asks at a time: DiscreteLenglerOnePlusOne), and the
record names the one it picked.

Its state is rebuilt, never unpickled: a checkpoint holds every told (genome, loss), and a resumed
run replays them through a new optimizer of the same seed, which asks the same genomes again.
"""

from __future__ import annotations

import numpy as np


UNFIT = 1e9  # what nevergrad is told of a broken genome (an infinite loss); it clips above 1e20


class Nevergrad:
    """NGOpt on genomes of `genome_length` genes over `library_size` matrices, seeded."""

    def __init__(self, genome_length: int, library_size: int, budget: int, seed: int, parallel: int,
                 start: list[int] | None = None):
        import nevergrad as ng

        self.genome_length, self.library_size = genome_length, library_size
        self.budget, self.seed, self.parallel = budget, seed, parallel
        space = ng.p.Choice(range(library_size), repetitions=genome_length, deterministic=True)
        space.random_state.seed(seed % 2 ** 32)
        if start is not None:  # its first ask, the point it searches from
            space.value = tuple(int(g) for g in start)
        self.optimizer = ng.optimizers.NGOpt(parametrization=space, budget=budget, num_workers=parallel)
        self.told: list[tuple[list[int], float]] = []

    @property
    def algorithm(self) -> str:
        """The optimizer NGOpt picked for this problem, through its wrappers (NGOpt → NGOpt16 → …)."""
        optimizer = self.optimizer
        while getattr(optimizer, "optim", None) is not None:
            optimizer = optimizer.optim
        return optimizer.name  # its configured name (DiscreteLenglerOnePlusOne), not its class (_OnePlusOne)

    def ask(self, n: int) -> tuple[np.ndarray, list]:
        """n genomes to evaluate (n, genome_length), and the candidates to tell their losses to."""
        candidates = [self.optimizer.ask() for _ in range(n)]
        return np.array([c.value for c in candidates], dtype=np.int64).reshape(n, self.genome_length), candidates

    def tell(self, candidates: list, losses: np.ndarray) -> None:
        for c, loss in zip(candidates, losses):
            loss = float(loss)
            self.optimizer.tell(c, loss if np.isfinite(loss) else UNFIT)
            self.told.append(([int(g) for g in c.value], loss))

    def recommendation(self) -> np.ndarray:
        return np.array(self.optimizer.provide_recommendation().value, dtype=np.int64)

    @classmethod
    def replay(cls, genome_length: int, library_size: int, budget: int, seed: int, parallel: int,
               told: list[tuple[list[int], float]], batches: list[int], start: list[int] | None = None) -> Nevergrad:
        """The optimizer as it was after `told`, asked in `batches` (the asks of each generation):
        the same seed asks the same genomes again; a mismatch means the checkpoint is another run's."""
        out, i = cls(genome_length, library_size, budget, seed, parallel, start), 0
        for n in batches:
            genomes, candidates = out.ask(n)
            expected = np.array([g for g, _ in told[i:i + n]], dtype=np.int64).reshape(n, genome_length)
            if not np.array_equal(genomes, expected):
                raise ValueError("replayed asks differ from the checkpoint's")
            out.tell(candidates, np.array([loss for _, loss in told[i:i + n]]))
            i += n
        return out
