"""Genetic search over genomes as an explicit ask/tell loop (evosax style). Fitness is minimised.

    state = init(config, seed)
    state = tell(config, state, state.population, evaluate(state.population))
    for _ in range(generations):
        children, state = ask(config, state)
        state = tell(config, state, children, evaluate(children))

`GAState` holds everything the search needs, the random generator included, and round-trips
through JSON, so a run can stop after any generation and resume bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

SELECTIONS = ("tournament", "boltzmann")
CROSSOVERS = ("single_point", "uniform")


@dataclass(frozen=True)
class GAConfig:
    population: int
    genome_length: int
    library_size: int
    elite: int = 2
    selection: str = "tournament"
    tournament: int = 5
    temperature: float = 1.0  # Boltzmann: initial temperature, in units of the fitness spread
    temperature_decay: float = 0.95  # Boltzmann: multiplied in every generation
    crossover: str = "single_point"
    crossover_rate: float = 0.75
    mutation_rate: float = 0.08  # per gene

    @classmethod
    def from_params(cls, evolve, genome_length: int, library_size: int) -> GAConfig:
        """From the params.yaml `evolve` section (EvolveParams) and the genome's shape."""
        return cls(population=evolve.population, genome_length=genome_length, library_size=library_size,
                   elite=evolve.elite, selection=evolve.selection, tournament=evolve.tournament,
                   temperature=evolve.temperature, temperature_decay=evolve.temperature_decay,
                   crossover=evolve.crossover, crossover_rate=evolve.crossover_rate, mutation_rate=evolve.mutation_rate)

    def __post_init__(self):
        if not 0 <= self.elite < self.population:
            raise ValueError("elite must be below the population size")
        if self.selection not in SELECTIONS or self.crossover not in CROSSOVERS:
            raise ValueError(f"selection in {SELECTIONS}, crossover in {CROSSOVERS}")


@dataclass(frozen=True)
class GAState:
    generation: int
    population: np.ndarray  # (P, N) genes
    fitness: np.ndarray  # (P,) losses; +inf for unfit, nan before evaluation
    evaluated: np.ndarray  # (P,) True where the fitness is a true evaluation, not a surrogate's guess
    best_genome: np.ndarray
    best_fitness: float
    rng: dict = field(repr=False)  # numpy bit-generator state

    def to_json(self) -> dict:
        return {"generation": self.generation, "population": self.population.tolist(),
                "fitness": [_num(f) for f in self.fitness], "evaluated": self.evaluated.tolist(),
                "best_genome": self.best_genome.tolist(),
                "best_fitness": _num(self.best_fitness), "rng": self.rng}

    @classmethod
    def from_json(cls, data: dict) -> GAState:
        return cls(int(data["generation"]), np.asarray(data["population"], dtype=np.int64),
                   np.asarray([float(f) for f in data["fitness"]], dtype=np.float64),
                   np.asarray(data["evaluated"], dtype=bool), np.asarray(data["best_genome"], dtype=np.int64), float(data["best_fitness"]), data["rng"])


def _num(f: float):
    return f if math.isfinite(f) else ("inf" if f > 0 else "nan" if math.isnan(f) else "-inf")


def _rng(state: GAState) -> np.random.Generator:
    g = np.random.default_rng()
    g.bit_generator.state = state.rng
    return g


def random_genomes(n: int, config: GAConfig, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, config.library_size, size=(n, config.genome_length), dtype=np.int64)


def sample(config: GAConfig, state: GAState, n: int) -> tuple[np.ndarray, GAState]:
    """n random genomes drawn from the state's generator (random search's ask)."""
    rng = _rng(state)
    return random_genomes(n, config, rng), replace(state, rng=rng.bit_generator.state)


def init(config: GAConfig, seed: int) -> GAState:
    rng = np.random.default_rng(seed)
    population = random_genomes(config.population, config, rng)
    return GAState(0, population, np.full(config.population, np.nan), np.zeros(config.population, dtype=bool),
                   population[0].copy(), math.inf, rng.bit_generator.state)


# --- operators: pure functions of their inputs and a generator ------------------------------

def tournament_select(fitness: np.ndarray, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n winners, each the fittest of k individuals drawn with replacement (ties: lower index)."""
    entrants = rng.integers(0, len(fitness), size=(n, k))
    return entrants[np.arange(n), np.argmin(fitness[entrants], axis=1)]


def boltzmann_select(fitness: np.ndarray, temperature: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws with probability ∝ exp(-(f - f_min) / (T · spread)); unfit (+inf) never drawn."""
    finite = np.isfinite(fitness)
    if not finite.any():
        return rng.integers(0, len(fitness), size=n)
    f = np.where(finite, fitness, np.inf)
    spread = max(float(np.std(f[finite])), 1e-12)
    logits = -(f - f[finite].min()) / (max(temperature, 1e-12) * spread)
    p = np.exp(logits - logits[finite].max())
    return rng.choice(len(fitness), size=n, p=p / p.sum())


def single_point_crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """a's genes up to a point c ~ U{1..N-1}, then b's."""
    c = int(rng.integers(1, len(a)))
    return np.concatenate([a[:c], b[c:]])


def uniform_crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(len(a)) < 0.5, a, b)


def mutate(genome: np.ndarray, rate: float, library_size: int, rng: np.random.Generator) -> np.ndarray:
    """Each gene, with probability `rate`, moves to a different library index, uniformly."""
    out = genome.copy()
    hits = np.flatnonzero(rng.random(len(genome)) < rate)
    shift = rng.integers(1, library_size, size=len(hits))  # never 0: a mutation always changes the gene
    out[hits] = (out[hits] + shift) % library_size
    return out


def elites(fitness: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n fittest (stable: earlier wins ties)."""
    return np.argsort(fitness, kind="stable")[:n]


# --- ask / tell --------------------------------------------------------------------------------

def temperature(config: GAConfig, generation: int) -> float:
    return config.temperature * config.temperature_decay ** generation


def ask(config: GAConfig, state: GAState) -> tuple[np.ndarray, GAState]:
    """The next population: the elite (the best truly evaluated genomes) unchanged, then children
    of parents selected on every fitness, true or predicted."""
    if np.isnan(state.fitness).any():
        raise ValueError("ask() needs a fully evaluated population: call tell() first")
    rng = _rng(state)
    fitness = state.fitness
    true_fitness = np.where(state.evaluated, fitness, np.inf)
    elite = [i for i in elites(true_fitness, config.elite) if state.evaluated[i]]
    n_children = config.population - len(elite)
    if config.selection == "tournament":
        parents = tournament_select(fitness, config.tournament, 2 * n_children, rng)
    else:
        parents = boltzmann_select(fitness, temperature(config, state.generation), 2 * n_children, rng)
    cross = single_point_crossover if config.crossover == "single_point" else uniform_crossover
    children = []
    for i in range(n_children):
        a, b = state.population[parents[2 * i]], state.population[parents[2 * i + 1]]
        child = cross(a, b, rng) if rng.random() < config.crossover_rate else a.copy()
        children.append(mutate(child, config.mutation_rate, config.library_size, rng))
    population = np.concatenate([state.population[elite].reshape(-1, config.genome_length),
                                 np.asarray(children, dtype=np.int64).reshape(-1, config.genome_length)])
    return population, replace(state, rng=rng.bit_generator.state)


def tell(config: GAConfig, state: GAState, population: np.ndarray, fitness: np.ndarray,
         evaluated: np.ndarray | None = None) -> GAState:
    """Adopt a scored population. `evaluated` marks true evaluations (default: all); the best
    genome is only ever a truly evaluated one, never a surrogate's guess."""
    fitness = np.asarray(fitness, dtype=np.float64).copy()
    fitness[~np.isfinite(fitness)] = np.inf  # NaN or inf: unfit, never selected as best
    evaluated = np.ones(len(fitness), dtype=bool) if evaluated is None else np.asarray(evaluated, dtype=bool)
    best, best_fitness = state.best_genome, state.best_fitness
    true_fitness = np.where(evaluated, fitness, np.inf)
    i = int(np.argmin(true_fitness))
    if true_fitness[i] < best_fitness:
        best, best_fitness = population[i].copy(), float(true_fitness[i])
    generation = state.generation + (0 if np.isnan(state.fitness).all() else 1)
    return replace(state, generation=generation, population=np.asarray(population, dtype=np.int64),
                   fitness=fitness, evaluated=evaluated, best_genome=best, best_fitness=best_fitness)
