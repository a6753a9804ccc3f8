"""nevergrad's NGOpt on CLSO's genome (clso.search.ngopt): seeded, replayable, and it optimizes."""

import numpy as np
import pytest

from clso.search.ngopt import Nevergrad

TARGET = np.array([3, 1, 4, 1, 5, 9, 2, 6])


def losses(genomes):
    return (genomes != TARGET).sum(axis=1).astype(float)  # genes away from a planted genome


BUDGET = 320


def run(seed, generations=40, n=8):
    opt, batches = Nevergrad(8, 16, budget=BUDGET, seed=seed, parallel=n), []
    for _ in range(generations):
        genomes, candidates = opt.ask(n)
        opt.tell(candidates, losses(genomes))
        batches.append(n)
    return opt, batches


def test_ngopt_finds_better_genomes_than_it_started_with_and_names_its_algorithm():
    opt, _ = run(0)
    first = min(loss for _, loss in opt.told[:8])
    assert min(loss for _, loss in opt.told) < first
    assert losses(opt.recommendation()[None])[0] <= first
    import nevergrad as ng

    assert opt.algorithm in ng.optimizers.registry and not opt.algorithm.startswith("NGOpt")  # its configured name


def test_the_same_seed_asks_the_same_genomes_and_a_replay_rebuilds_the_state():
    a, batches = run(1, generations=10)
    b, _ = run(1, generations=10)
    assert a.told == b.told
    again = Nevergrad.replay(8, 16, BUDGET, 1, 8, a.told, batches)
    genomes, _ = again.ask(8)
    c, _ = run(1, generations=11)
    assert np.array_equal(genomes, np.array([g for g, _ in c.told[80:88]]))
    with pytest.raises(ValueError, match="differ"):
        Nevergrad.replay(8, 16, BUDGET, 2, 8, a.told, batches)
