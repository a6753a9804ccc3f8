"""CLSO's search: the GA of `clso.search.ga` with the surrogate in the loop, local search, an optional
hybrid phase of Adam on the continuous parts, and a checkpoint after every generation.

Per generation a fraction X of the children is truly evaluated — the best by surrogate score
plus random picks, on top of children whose loss is already known — and the rest get the
surrogate's predicted loss. Only true evaluations can make a genome the best or an elite.

The same loop runs the controls that say what each part of CLSO buys (`strategy`):
  no_surrogate  the GA with every child truly evaluated, until it has spent a given FLOP budget;
  random        random genomes, as many true evaluations per generation as a schedule allows;
  fixed_body    one seeded random genome, never searched: only the hybrid phases train.
  ngopt         nevergrad's NGOpt on the genome (clso.search.ngopt), as many true evaluations per generation
                as random search; after each hybrid phase it starts afresh from the best genome (the losses
                it was told are stale).
  head_only     the fixed body, its phases reaching only what a gradient reaches without passing through
                the body: the tied head (its output side) and the final LayerNorm. No backward pass
                through the body: the truly backprop-free hybrid.
Controls have no patience: each spends its whole budget. Every strategy is charged alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from clso import ClsoError
from clso.context import derive_seed, precision_context
from clso.data.tokens import random_batch
from clso.energy import EnergyMeter, EnergyReading
from clso.io import write_bytes_atomic, write_text_atomic
from clso.model.flops import backward_flops, forward_flops
from clso.params import MODES
from clso.search import ga
from clso.search.ngopt import Nevergrad
from clso.search.problem import Search
from clso.search.surrogate import Surrogate
from clso.search.workers import with_workers

CHECKPOINT_VERSION = 6
STRATEGIES = ("ga", "no_surrogate", "random", "fixed_body", "head_only", "ngopt")
FIXED = ("fixed_body", "head_only")  # one random genome, never searched
HISTORY_FIELDS = ("generation", "best_loss", "mean_loss", "std_loss", "true_evaluations", "surrogate_predictions",
                  "energy_wh", "energy_method", "flops", "wall_s")


@dataclass
class Totals:
    """Cost so far, carried across resumed segments. Writing checkpoints is metered apart: it is
    neither side's training cost (the baseline writes none)."""

    energy_j: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    flops: int = 0
    methods: list[str] = field(default_factory=list)
    checkpoint_energy_j: float = 0.0
    checkpoint_wall_s: float = 0.0
    # the search's energy by part: CPU (RAPL or estimate) and GPU (NVML or estimate), with their methods
    cpu_j: float = 0.0
    gpu_j: float = 0.0
    cpu_methods: list[str] = field(default_factory=list)
    gpu_methods: list[str] = field(default_factory=list)
    # evolve.workers: what the actors computed beyond one process's FLOPs, and actors that died
    workers_extra_flops: int = 0
    workers_replaced: int = 0
    adam_flops: int = 0  # the hybrid phases' Adam steps: a shared part, not the search under test

    @property
    def search_flops(self) -> int:
        """FLOPs of the search itself: everything but the Adam steps."""
        return self.flops - self.adam_flops

    def plus(self, search: EnergyReading, checkpoints: EnergyReading | None = None,
             workers: list[EnergyReading] = ()) -> Totals:
        """These totals with one segment's search and checkpoint readings added, and the readings of
        the evaluation workers that worked for it (their energy and CPU time; their wall time ran
        beside the search's)."""
        search = with_workers(search, list(workers))
        methods = lambda joined: set(joined.split("|")) if joined else set()  # noqa: E731
        return Totals(self.energy_j + search.energy_wh * 3600, self.cpu_s + search.cpu_s, self.wall_s + search.wall_s,
                      self.flops, sorted(set(self.methods) | methods(search.method)),
                      self.checkpoint_energy_j + (checkpoints.energy_wh * 3600 if checkpoints else 0.0),
                      self.checkpoint_wall_s + (checkpoints.wall_s if checkpoints else 0.0),
                      self.cpu_j + search.cpu_wh * 3600, self.gpu_j + search.gpu_wh * 3600,
                      sorted(set(self.cpu_methods) | methods(search.cpu_method)),
                      sorted(set(self.gpu_methods) | methods(search.gpu_method)), self.workers_extra_flops,
                      self.workers_replaced, self.adam_flops)

    def by_device(self) -> dict:
        """The parts, as a stage's metrics give them (EnergyReading.as_metrics); none for CPU-only work."""
        if not self.gpu_methods:
            return {}
        return {"cpu_wh": round(self.cpu_j / 3600, 6), "cpu_method": "|".join(self.cpu_methods),
                "gpu_wh": round(self.gpu_j / 3600, 6), "gpu_method": "|".join(self.gpu_methods)}


@dataclass
class Run:
    """Everything the loop carries from one generation to the next (JSON + two tensor files)."""

    ga_state: ga.GAState
    rng: dict
    true_evaluations: int = 0
    surrogate_predictions: int = 0
    since_improvement: int = 0
    stopped: str | None = None
    totals: Totals = field(default_factory=Totals)
    history: list[dict] = field(default_factory=list)
    adam_at: list[int] = field(default_factory=list)  # the search FLOPs (Totals.search_flops) at each hybrid phase
    # ngopt: nevergrad's run since its last start (index, start genome, budget, asks per generation, told)
    segment: dict | None = None
    algorithms: list[str] = field(default_factory=list)  # ngopt: the algorithm NGOpt picked, segment by segment
    asks: int = 0  # ngopt: genomes asked of nevergrad, its repeats of known genomes included


@dataclass(frozen=True)
class Budget:
    """What a control may spend, matched to a GA run and to everything CLSO was charged for it."""

    # random: cumulative true evaluations allowed after each generation — the surrogate's
    # pretraining genomes plus the GA's cumulative count
    evaluations: tuple[int, ...] | None = None
    # no_surrogate: the GA's search FLOPs (its Adam steps excluded) plus the surrogate stage's (its
    # evaluations and training); checked between generations, so the last one may cross it
    flops: int | None = None
    generations: int | None = None  # fixed_body: the GA's generations, so the same hybrid phases
    # no_surrogate in hybrid mode: the GA's hybrid phases, each at the share of its search FLOPs it
    # had spent then; the control runs each at that share of `flops`, so it gets exactly the GA's phases
    adam_at: tuple[float, ...] | None = None


NO_SURROGATE_GENERATION_CAP = 10  # × evolve.generations
NGOPT_RETRIES = 100  # asks for more, per generation, while nevergrad repeats known genomes
BUDGET_OF = {"random": "evaluations", "no_surrogate": "flops", "fixed_body": "generations", "head_only": "generations",
             "ngopt": "evaluations"}  # what each control needs


class Checkpoints:
    """One run's checkpoint folder. Tensors go to files named by generation first; state.json,
    replaced atomically last, names them: a kill at any instant leaves a consistent checkpoint,
    the new one or the old one."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    def load(self, search: Search, surrogate: Surrogate | None) -> Run | None:
        """The run saved here, its surrogate, continuous weights and fitness cache restored; None when
        there is none, or it is another configuration's, or it had finished."""
        path = self.folder / "state.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if (data.get("version") != CHECKPOINT_VERSION or data.get("fingerprint") != self.fingerprint
                    or data.get("stopped")):
                return None
            if surrogate is not None:
                surrogate.load_state_dict(load_file(str(self.folder / data["surrogate_file"])))
            search.model.load_continuous_state(load_file(str(self.folder / data["continuous_file"])))
            search.evaluator.cache = {tuple(g): float(v) for g, v in data["cache"]}
            return Run(ga.GAState.from_json(data["ga"]), data["rng"], data["true_evaluations"],
                       data["surrogate_predictions"], data["since_improvement"], data["stopped"],
                       Totals(**data["totals"]), data["history"], data["adam_at"], data["segment"],
                       data["algorithms"], data["asks"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ClsoError(f"{self.folder}: checkpoint unreadable ({type(e).__name__}); delete the "
                            "folder to start the search afresh") from None

    def save(self, run: Run, totals: Totals, search: Search, surrogate: Surrogate | None) -> None:
        stamp = len(run.history)
        files = {"continuous_file": f"continuous-{stamp}.safetensors"}
        self.folder.mkdir(parents=True, exist_ok=True)
        if surrogate is not None:
            files["surrogate_file"] = f"surrogate-{stamp}.safetensors"
            write_bytes_atomic(self.folder / files["surrogate_file"], save(surrogate.state_dict()))
        write_bytes_atomic(self.folder / files["continuous_file"], save(search.model.continuous_state()))
        data = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, **files, "ga": run.ga_state.to_json(),
                "rng": run.rng, "true_evaluations": run.true_evaluations,
                "surrogate_predictions": run.surrogate_predictions, "since_improvement": run.since_improvement,
                "stopped": run.stopped, "totals": totals.__dict__, "history": run.history, "adam_at": run.adam_at,
                "segment": run.segment, "algorithms": run.algorithms, "asks": run.asks,
                "cache": [[list(k), v if math.isfinite(v) else "inf"] for k, v in search.evaluator.cache.items()]}
        write_text_atomic(self.folder / "state.json", json.dumps(data))
        for old in self.folder.glob("*.safetensors"):
            if old.name not in files.values():
                old.unlink()


def adam_phase(search: Search, genome: np.ndarray, params, rng: np.random.Generator) -> int:
    """`params.hybrid_steps` Adam steps on the continuous parts of the model with `genome` set, on
    random train windows, in the search's precision; returns the FLOPs they cost (the library matrices pass gradients down
    but never train)."""
    model = search.model
    model.set_genome(genome)
    model.set_mode("hybrid")
    device = search.batch.x.device
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=params.hybrid_lr,
                           fused=True if device.type == "cuda" else None)  # as fast as the baseline's AdamW
    train = search.data.tokens("train")
    model.train()
    for _ in range(params.hybrid_steps):
        x, y = random_batch(train, params.hybrid_batch_size, search.config.block_size, rng, device)
        with precision_context(search.precision, device):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    model.set_mode("pure")
    t, b, per_layer = search.config.block_size, params.hybrid_batch_size, model.linear_flops(genome)
    return params.hybrid_steps * (forward_flops(search.config.gpt2(), t, b, per_layer)
                               + backward_flops(search.config.gpt2(), t, b, per_layer, train_linears=False))


def head_phase(search: Search, genome: np.ndarray, params, rng: np.random.Generator) -> int:
    """adam_phase's steps, batches and learning rate, reaching only the tied head (from its output side)
    and the final LayerNorm: the body runs without a graph, so no gradient passes through it to the
    embeddings' input side. Returns the FLOPs: the forward, and the head's backward (weight and input)."""
    model = search.model
    model.set_genome(genome)
    gpt, device = model.gpt2, search.batch.x.device
    ln_f, head = gpt.transformer.ln_f, gpt.lm_head
    trained = [head.weight, ln_f.weight, ln_f.bias]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=params.hybrid_lr, fused=True if device.type == "cuda" else None)
    seen = {}
    hook = ln_f.register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0]))
    train = search.data.tokens("train")
    try:
        for _ in range(params.hybrid_steps):
            x, y = random_batch(train, params.hybrid_batch_size, search.config.block_size, rng, device)
            with torch.no_grad(), precision_context(search.precision, device):
                gpt.transformer(input_ids=x)  # the body, up to the final LayerNorm's input
            with precision_context(search.precision, device):
                logits = F.linear(ln_f(seen["h"].detach()), head.weight)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        hook.remove()
        model.set_mode("pure")
    t, b, per_layer = search.config.block_size, params.hybrid_batch_size, model.linear_flops(genome)
    head_flops = 2 * search.config.n_embd * search.config.vocab_size * t * b
    return params.hybrid_steps * (forward_flops(search.config.gpt2(), t, b, per_layer) + 2 * head_flops)


class Evolution:
    def __init__(self, search: Search, params, surrogate: Surrogate | None, pretraining: tuple[np.ndarray, np.ndarray] | None,
                 seed: int, checkpoint_dir: str | Path, fingerprint: str, meter_options: dict,
                 strategy: str = "ga", budget: Budget = Budget(), mode: str = "pure"):
        if strategy not in STRATEGIES or mode not in MODES:
            raise ValueError(f"strategy must be one of {STRATEGIES} and mode one of {MODES}")
        if (strategy == "ga") != (surrogate is not None and pretraining is not None):
            raise ValueError("the GA needs its surrogate and pretraining data; a control uses neither")
        if strategy in FIXED and mode != "hybrid":
            raise ValueError("a fixed body trains nothing in pure mode")
        if strategy in BUDGET_OF and getattr(budget, BUDGET_OF[strategy]) is None:
            raise ValueError(f"the {strategy} control needs a budget of {BUDGET_OF[strategy]} matched to a GA run")
        self.search, self.params, self.surrogate = search, params, surrogate
        self.strategy, self.budget, self.mode = strategy, budget, mode
        self.ga_config = ga.GAConfig.from_params(params, search.genome_length, search.library.size)
        self.pretraining = pretraining
        self.seed = seed
        # a checkpoint of another strategy or budget, in a folder reused by mistake, is not resumed
        self.checkpoints = Checkpoints(checkpoint_dir, f"{fingerprint}/{strategy}/{mode}/{budget}")
        self.meter_options = meter_options
        self.run = self.checkpoints.load(search, surrogate) or self._start()
        self.cost: Totals | None = None  # everything spent so far, once a generation has run here
        self.nevergrad: Nevergrad | None = None  # ngopt: built (or replayed) on first use
        self.asked: list = []  # ngopt: the candidates of this generation's genomes
        self.target = 0  # ngopt: the true evaluations this generation must reach

    # --- state -----------------------------------------------------------------------------

    def _start(self) -> Run:
        state = ga.init(self.ga_config, derive_seed(self.seed, "evolve-ga"))
        run = Run(state, np.random.default_rng(derive_seed(self.seed, "evolve")).bit_generator.state)
        if self.pretraining is not None:
            self.search.evaluator.cache.update(zip(map(tuple, self.pretraining[0].tolist()), self.pretraining[1].tolist()))
        return run

    # --- one generation ----------------------------------------------------------------------

    def _true(self, genomes: np.ndarray) -> np.ndarray:
        losses = self.search.evaluator(genomes)
        self.run.true_evaluations += len(self.search.evaluator.last_computed)
        self.run.totals.flops += self.search.evaluator.last_flops
        self.run.totals.workers_extra_flops += self.search.evaluator.last_extra_flops
        return losses

    def _surrogate(self, genomes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The surrogate's score of each genome and the optimistic score it is ranked by: the mean
        less the ensemble's spread, so an uncertain genome gets its chance (one member: the mean)."""
        self.run.totals.flops += self.surrogate.inference_flops(len(genomes))
        mean, spread = self.surrogate.predict(genomes)
        return mean, mean - spread

    def _score(self, children: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """True losses for a fraction X (known ones, the surrogate's best, random picks), predictions for the rest."""
        cache = self.search.evaluator.cache
        known = np.array([tuple(c) in cache for c in children.tolist()])
        budget = max(1, math.ceil(self.params.full_eval_fraction * len(children)))
        unknown = np.flatnonzero(~known)
        chosen = np.zeros(len(children), dtype=bool)
        chosen[known] = True
        fitness = np.empty(len(children))
        if len(unknown):
            mean, optimistic = self._surrogate(children[unknown])
            fitness[unknown] = self.surrogate.to_loss(mean)
            top = unknown[np.argsort(optimistic, kind="stable")][:math.ceil(budget / 2)]
            rest = np.setdiff1d(unknown, top)
            picks = rng.choice(rest, size=min(len(rest), budget - len(top)), replace=False) if len(rest) else []
            chosen[top] = True
            chosen[np.asarray(picks, dtype=int)] = True
        fitness[chosen] = self._true(children[chosen])
        self.run.surrogate_predictions += int((~chosen).sum())
        return fitness, chosen

    def _local_search(self, rng: np.random.Generator) -> None:
        state = self.run.ga_state
        true_fitness = np.where(state.evaluated, state.fitness, np.inf)
        population, fitness = state.population.copy(), state.fitness.copy()
        for i in ga.elites(true_fitness, min(self.params.local_search_top, len(population))):
            if not np.isfinite(true_fitness[i]):
                continue
            neighbours = np.repeat(population[i][None], self.params.local_search_neighbours, axis=0)
            genes = rng.integers(0, self.search.genome_length, size=len(neighbours))
            shift = rng.integers(1, self.search.library.size, size=len(neighbours))
            neighbours[np.arange(len(neighbours)), genes] = (neighbours[np.arange(len(neighbours)), genes] + shift) \
                % self.search.library.size
            if self.surrogate is not None:  # the surrogate's favourite alone is truly evaluated
                best = neighbours[int(np.argmin(self._surrogate(neighbours)[1]))]
                loss = float(self._true(best[None])[0])
            else:
                losses = self._true(neighbours)
                best, loss = neighbours[int(np.argmin(losses))], float(losses.min())
            if loss < fitness[i]:
                population[i], fitness[i] = best, loss
        true_fitness = np.where(state.evaluated, fitness, np.inf)
        j = int(np.argmin(true_fitness))
        best_genome, best_fitness = state.best_genome, state.best_fitness
        if true_fitness[j] < best_fitness:
            best_genome, best_fitness = population[j].copy(), float(true_fitness[j])
        self.run.ga_state = replace(state, population=population, fitness=fitness, best_genome=best_genome,
                                    best_fitness=best_fitness)

    def _retrain_surrogate(self, generation: int) -> None:
        cache = self.search.evaluator.cache
        genomes = np.array(list(cache), dtype=np.int64)
        self.surrogate.fit(genomes, np.array(list(cache.values())), seed=derive_seed(self.seed, "surrogate", generation))
        self.run.totals.flops += self.surrogate.training_flops(len(genomes))

    def _hybrid_phase(self, rng: np.random.Generator) -> None:
        """Adam on the continuous parts for the best genome; every cached loss is then stale."""
        search, state = self.search, self.run.ga_state
        self.run.adam_at.append(self.run.totals.search_flops)
        flops = (head_phase if self.strategy == "head_only" else adam_phase)(search, state.best_genome, self.params, rng)
        self.run.totals.flops += flops
        self.run.totals.adam_flops += flops
        search.evaluator.invalidate()
        if self.strategy in ("random", "ngopt"):  # a fresh batch next generation: only the best carries on
            best_loss = float(self._true(state.best_genome[None])[0])
            self.run.ga_state = replace(state, population=state.best_genome[None].copy(), fitness=np.array([best_loss]),
                                        evaluated=np.ones(1, dtype=bool), best_fitness=best_loss)
            if self.strategy == "ngopt":  # what nevergrad was told is stale: it starts afresh from the best
                self._restart(state.best_genome)
            return
        fitness = state.fitness.copy()
        fitness[state.evaluated] = self._true(state.population[state.evaluated])
        best_loss = float(self._true(state.best_genome[None])[0])
        self.run.ga_state = replace(state, fitness=fitness, best_fitness=best_loss)

    def _nevergrad(self) -> Nevergrad:
        """ngopt's optimizer for the current segment, rebuilt by replaying it after a resume."""
        if self.nevergrad is None:
            if self.run.segment is None:
                self._restart(None)
            seg = self.run.segment
            self.nevergrad = Nevergrad.replay(
                self.search.genome_length, self.search.library.size, seg["budget"],
                derive_seed(self.seed, "ngopt", seg["index"]), self._parallel(), seg["told"],
                seg["batches"], seg["start"])
            seg["told"] = self.nevergrad.told
            if len(self.run.algorithms) <= seg["index"]:
                self.run.algorithms.append(self.nevergrad.algorithm)
        return self.nevergrad

    def _ask(self, n: int) -> np.ndarray:
        genomes, self.asked = self._nevergrad().ask(n)
        self.run.segment["batches"].append(n)
        self.run.asks += n
        return genomes

    def _told(self, population: np.ndarray, fitness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tell nevergrad its genomes' losses. A genome it asks again is known, so no true evaluation:
        it is asked for more until the generation has the schedule's true evaluations."""
        self.nevergrad.tell(self.asked, fitness)
        for _ in range(NGOPT_RETRIES):
            short = self.target - self.run.true_evaluations
            if short <= 0:
                break
            genomes = self._ask(short)
            losses = self._true(genomes)
            self.nevergrad.tell(self.asked, losses)
            population, fitness = np.concatenate([population, genomes]), np.concatenate([fitness, losses])
        return population, fitness

    def _parallel(self) -> int:
        """nevergrad's num_workers: the GA's median true evaluations per generation (its first, with the
        surrogate's pretraining genomes, aside)."""
        per_generation = np.diff(self.budget.evaluations)
        return max(1, int(np.median(per_generation))) if len(per_generation) else 1

    def _restart(self, start) -> None:
        index = -1 if self.run.segment is None else self.run.segment["index"]
        budget = max(1, self.budget.evaluations[-1] - self.run.true_evaluations)
        self.run.segment = {"index": index + 1, "start": None if start is None else [int(g) for g in start],
                            "budget": int(budget), "batches": [], "told": []}
        self.nevergrad = None

    def step(self) -> None:
        run, params = self.run, self.params
        rng = np.random.default_rng()
        rng.bit_generator.state = run.rng
        first = bool(np.isnan(run.ga_state.fitness).all())  # generation 0: score the first population
        before = run.ga_state.best_fitness
        population, state = self._propose(first)
        if self.strategy == "ga":
            fitness, chosen = self._score(population, rng)
        else:
            fitness, chosen = self._true(population), np.ones(len(population), dtype=bool)
        if self.strategy == "ngopt" and self.asked:
            population, fitness = self._told(population, fitness)
            chosen = np.ones(len(population), dtype=bool)
        run.ga_state = ga.tell(self.ga_config, state, population, fitness, chosen)
        if not first:
            generation = run.ga_state.generation
            if self.strategy in ("ga", "no_surrogate") and generation % params.local_search_every == 0:
                self._local_search(rng)
            # a hybrid phase makes a new landscape: the re-evaluated best counts as progress
            phases = self._phases_due(generation)
            run.since_improvement = 0 if phases or run.ga_state.best_fitness < before else run.since_improvement + 1
            if self.strategy == "ga" and generation % params.surrogate_every == 0 and self._stop() is None:
                self._retrain_surrogate(generation)  # not after the last generation: no one would use it
            for _ in range(phases):
                self._hybrid_phase(rng)
        chosen_fitness = run.ga_state.fitness[run.ga_state.evaluated]
        run.rng = rng.bit_generator.state
        finite = chosen_fitness[np.isfinite(chosen_fitness)]
        run.history.append({
            "generation": run.ga_state.generation, "best_loss": run.ga_state.best_fitness,
            "mean_loss": float(finite.mean()) if len(finite) else math.inf,
            "std_loss": float(finite.std()) if len(finite) else 0.0,
            "true_evaluations": run.true_evaluations, "surrogate_predictions": run.surrogate_predictions,
        })
        run.stopped = self._stop()
        if run.stopped is not None and self.budget.adam_at is not None:  # a phase the GA had is never left out
            for _ in range(len(self.budget.adam_at) - len(run.adam_at)):
                self._hybrid_phase(rng)
            run.rng = rng.bit_generator.state

    def _hybrid_at(self, generation: int) -> bool:
        return self.mode == "hybrid" and generation > 0 and generation % self.params.hybrid_every == 0

    def _phases_due(self, generation: int) -> int:
        """Hybrid phases to run after this generation: one every evolve.hybrid_every generations, or, on a
        FLOP budget, as many of the GA's as the search FLOPs spent so far have reached."""
        if self.budget.adam_at is None:
            return int(self._hybrid_at(generation))
        spent = self.run.totals.search_flops / self.budget.flops
        return sum(share <= spent for share in self.budget.adam_at) - len(self.run.adam_at)

    @property
    def adam_phases(self) -> int:
        """Hybrid phases run so far: what a hybrid control matches and a hybrid contrast must state."""
        return len(self.run.adam_at)

    @property
    def generation_limit(self) -> int:
        """The GA's is evolve.generations (random search's schedule is as long), the fixed body's its budget.
        The GA without surrogate runs until its FLOPs are spent — a generation limit would leave it
        short of CLSO's budget — with a cap against a converged population that costs nothing."""
        if self.strategy == "no_surrogate":
            return NO_SURROGATE_GENERATION_CAP * self.params.generations
        return self.budget.generations or self.params.generations

    def _stop(self) -> str | None:
        run, params = self.run, self.params
        if run.ga_state.generation >= self.generation_limit:
            return "generation limit"
        if self.budget.flops is not None and run.totals.search_flops >= self.budget.flops:
            return "FLOP budget spent"
        if self.budget.evaluations is not None and run.ga_state.generation >= len(self.budget.evaluations) - 1:
            return "evaluation schedule done"
        if self.strategy == "ga" and run.since_improvement >= params.patience:
            return f"no improvement in {params.patience} generations"
        return None

    def _propose(self, first: bool) -> tuple[np.ndarray, ga.GAState]:
        """This generation's genomes: the GA's children, random ones, or the one fixed body."""
        state = self.run.ga_state
        if self.strategy in FIXED:
            return state.population[:1], state
        if self.strategy in ("random", "ngopt"):
            schedule = self.budget.evaluations
            generation = 0 if first else state.generation + 1
            allowed = schedule[min(generation, len(schedule) - 1)]
            # a hybrid phase this generation re-scores the best once: keep that inside the schedule
            n = allowed - self.run.true_evaluations - int(self._hybrid_at(generation))
            if n <= 0:  # nothing left this generation: the best, already known, costs nothing
                self.asked = []
                return state.best_genome[None], state
            if self.strategy == "ngopt":
                self.target = allowed - int(self._hybrid_at(generation))
                return self._ask(n), state
            return ga.sample(self.ga_config, state, n)
        return (state.population, state) if first else ga.ask(self.ga_config, state)

    def run_to_end(self, on_generation=None, stop_after: int | None = None) -> Run:
        """Generations until a stop; `stop_after` ends this process early, as a kill would (tests)."""
        done_here = 0
        with EnergyMeter(**self.meter_options) as meter:
            checkpoints = None  # this segment's checkpoint writing, metered apart from the search
            pool = self.search.evaluator.pool
            replaced = pool.replaced if pool is not None else 0
            start_up = pool.take_start_up() if pool is not None else None  # the driver waited for its actors
            workers = None  # this segment's evaluation workers (evolve.workers): the sum of their readings
            while self.run.stopped is None:
                self.step()
                reading = meter.read()
                taken = self.search.evaluator.take_worker_readings()
                if taken:
                    workers = with_workers(workers or taken[0].minus(taken[0]), taken)
                if pool is not None:
                    self.run.totals.workers_replaced += pool.replaced - replaced
                    replaced = pool.replaced
                search = reading.minus(checkpoints) if checkpoints else reading
                search = search.plus(start_up) if start_up else search
                totals = self.run.totals.plus(search, checkpoints, [workers] if workers else [])
                self.run.history[-1].update({"energy_wh": totals.energy_j / 3600, "energy_method": "|".join(totals.methods),
                                             "flops": totals.flops, "wall_s": totals.wall_s})
                self.checkpoints.save(self.run, totals, self.search, self.surrogate)
                written = meter.read().minus(reading)
                checkpoints = written if checkpoints is None else checkpoints.plus(written)
                self.cost = self.run.totals.plus(search, checkpoints, [workers] if workers else [])
                if on_generation:
                    on_generation(self.run)
                done_here += 1
                if stop_after is not None and done_here >= stop_after and self.run.stopped is None:
                    raise KeyboardInterrupt
        return self.run

