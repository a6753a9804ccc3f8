import json

import numpy as np
import pytest

from clso.search import ga

CFG = ga.GAConfig(population=20, genome_length=6, library_size=50, elite=2)


def test_single_point_crossover_cuts_once_inside_the_genome():
    a, b = np.zeros(6, dtype=int), np.ones(6, dtype=int)
    rng = np.random.default_rng(0)
    points = set()
    for _ in range(300):
        child = ga.single_point_crossover(a, b, rng)
        c = int(np.argmax(child))  # first gene taken from b
        assert (child[:c] == 0).all() and (child[c:] == 1).all()
        points.add(c)
    assert points == {1, 2, 3, 4, 5}


def test_uniform_crossover_mixes_gene_by_gene():
    child = ga.uniform_crossover(np.zeros(1000, dtype=int), np.ones(1000, dtype=int), np.random.default_rng(0))
    assert 0.45 < child.mean() < 0.55


def test_mutation_rate_in_expectation_and_every_mutation_changes_the_gene():
    rng = np.random.default_rng(1)
    genome = np.arange(50) % 7
    changed = [ga.mutate(genome, 0.08, 7, rng) != genome for _ in range(2000)]
    assert np.mean(changed) == pytest.approx(0.08, abs=0.005)
    mutated = ga.mutate(np.zeros(10000, dtype=int), 1.0, 2, rng)
    assert (mutated == 1).all()


def test_tournament_prefers_better_and_unfit_never_wins_against_fit():
    fitness = np.arange(10, dtype=float)
    counts = np.bincount(ga.tournament_select(fitness, 5, 20000, np.random.default_rng(0)), minlength=10)
    assert (np.diff(counts) < 0).all()  # strictly fewer wins as fitness worsens
    fitness[0] = np.inf
    wins = ga.tournament_select(fitness, 2, 5000, np.random.default_rng(0))
    assert (wins == 0).mean() < 0.02  # only when both entrants are the unfit one


def test_boltzmann_prefers_better_and_never_draws_unfit():
    fitness = np.array([1.0, 2.0, 3.0, np.inf])
    draws = ga.boltzmann_select(fitness, 0.5, 20000, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=4)
    assert counts[0] > counts[1] > counts[2] and counts[3] == 0


def evaluate(population):
    return (population % 7).sum(1).astype(float)  # a planted problem: genes ≡ 0 (mod 7) are best


def run(generations, seed=0, cfg=CFG):
    state = ga.init(cfg, seed)
    state = ga.tell(cfg, state, state.population, evaluate(state.population))
    for _ in range(generations):
        children, state = ga.ask(cfg, state)
        state = ga.tell(cfg, state, children, evaluate(children))
    return state


def test_elitism_keeps_the_best():
    state = run(3)
    children, _ = ga.ask(CFG, state)
    best = np.argsort(state.fitness, kind="stable")[:2]
    np.testing.assert_array_equal(children[:2], state.population[best])
    later = run(8)
    assert later.best_fitness <= state.best_fitness
    assert evaluate(later.best_genome[None])[0] == later.best_fitness


def test_state_round_trips_through_json_and_resumes_identically():
    state = run(4)
    restored = ga.GAState.from_json(json.loads(json.dumps(state.to_json())))
    a, _ = ga.ask(CFG, state)
    b, _ = ga.ask(CFG, restored)
    np.testing.assert_array_equal(a, b)
    assert restored.generation == state.generation == 4


def test_tell_treats_nan_as_unfit_and_never_makes_it_best():
    state = ga.init(CFG, 0)
    fitness = np.full(CFG.population, np.nan)
    fitness[5] = 3.0
    state = ga.tell(CFG, state, state.population, fitness)
    assert np.isinf(state.fitness[0]) and state.best_fitness == 3.0
    np.testing.assert_array_equal(state.best_genome, state.population[5])


def test_same_seed_same_search():
    a, b = run(5, seed=3), run(5, seed=3)
    np.testing.assert_array_equal(a.population, b.population)
    assert a.best_fitness == b.best_fitness


def test_surrogate_scores_never_make_a_best_or_an_elite():
    state = run(2)
    fitness = evaluate(state.population)
    guessed = np.ones(CFG.population, dtype=bool)
    guessed[0] = False
    fitness[0] = -100.0  # a surrogate's wild guess
    told = ga.tell(CFG, state, state.population, fitness, evaluated=guessed)
    assert told.best_fitness > -100.0
    children, _ = ga.ask(CFG, told)
    assert not any((c == state.population[0]).all() for c in children[:CFG.elite]) or \
        (state.population[0] == state.population[1:]).all(1).any()
