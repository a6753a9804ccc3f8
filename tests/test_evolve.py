"""The search loop on a planted problem (fast, optimum known) and on a real tiny GPT-2."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clso.energy import EnergyMeter
from clso.params import EvolveParams, defaults
from clso.search import ga
from clso.search.evaluate import population_losses
from clso.search.evolve import Evolution
from clso.search.problem import build_search, sample_for_surrogate
from clso.search.surrogate import Surrogate, SurrogateConfig

N, M = 8, 32
TABLE = np.random.default_rng(5).gamma(2.0, 0.05, size=(N, M))
OPTIMUM = 1.0 + TABLE.min(1).sum()


class PlantedEvaluator:
    """Loss = 1 + Σ table[k, gene_k]; genomes with gene 0 == 13 are broken (NaN)."""

    def __init__(self):
        self.cache, self.computed, self.last_computed, self.last_flops = {}, 0, [], 0
        self.pool, self.last_extra_flops = None, 0  # evaluates in this process

    def __call__(self, genomes):
        keys = [tuple(int(x) for x in g) for g in np.asarray(genomes).reshape(-1, N)]
        self.last_computed = [k for k in dict.fromkeys(keys) if k not in self.cache]
        for k in self.last_computed:
            loss = 1.0 + TABLE[np.arange(N), list(k)].sum()
            self.cache[k] = math.inf if k[0] == 13 else float(loss)
        self.computed += len(self.last_computed)
        self.last_flops = 1000 * len(self.last_computed)
        return np.array([self.cache[k] for k in keys])

    def invalidate(self):
        self.cache.clear()

    def take_worker_readings(self):
        return []


class NoContinuousParts:
    def continuous_state(self):
        return {"none": torch.zeros(1)}

    def load_continuous_state(self, state):
        pass


def without_timing(history):
    """A run's history less what the clock measures: the rest must match bit for bit."""
    return [{k: v for k, v in r.items() if k not in ("energy_wh", "wall_s")} for r in history]


def planted_search():
    return SimpleNamespace(evaluator=PlantedEvaluator(), genome_length=N, library=SimpleNamespace(size=M),
                           model=NoContinuousParts(),
                           gene_buckets=tuple(k % 4 for k in range(N)))


def evolution(tmp_path, seed=0, **overrides):
    cfg = defaults(EvolveParams)
    cfg = EvolveParams(**{**cfg.__dict__, "population": 24, "generations": 25, "patience": 100,
                          "local_search_every": 10, "surrogate_every": 5, **overrides})
    search = planted_search()
    rng = np.random.default_rng(seed)
    genomes = rng.integers(0, M, size=(60, N))
    losses = search.evaluator(genomes)
    surrogate = Surrogate(SurrogateConfig(search.gene_buckets, M, steps=60), seed=seed)
    surrogate.fit(genomes, losses, seed=seed)
    return Evolution(search, cfg, surrogate, (genomes, losses), seed, tmp_path / "ckpt", "fp",
                     dict(device="cpu", rapl_root=tmp_path / "no-rapl"))


def test_search_beats_random_sampling_with_the_same_true_evaluations(tmp_path):
    wins = 0
    for seed in range(3):
        evo = evolution(tmp_path / str(seed), seed=seed)
        run = evo.run_to_end()
        spent = evo.search.evaluator.computed
        rng = np.random.default_rng(100 + seed)
        random_best = PlantedEvaluator()(rng.integers(0, M, size=(spent, N))).min()
        wins += run.ga_state.best_fitness < random_best
        # not just better: the search closes most of the gap to the known optimum that sampling leaves
        assert run.ga_state.best_fitness - OPTIMUM < 0.6 * (random_best - OPTIMUM)
    assert wins == 3


def test_best_is_always_truly_evaluated_and_broken_genomes_are_unfit(tmp_path):
    evo = evolution(tmp_path)
    run = evo.run_to_end()
    best = run.ga_state.best_genome
    assert run.ga_state.best_fitness == PlantedEvaluator()(best[None])[0]
    assert best[0] != 13 and math.isfinite(run.ga_state.best_fitness)
    assert run.surrogate_predictions > 0 and run.true_evaluations > 0
    assert len(run.history) == 26 and run.stopped == "generation limit"
    assert [r["generation"] for r in run.history] == list(range(26))
    assert all(r["energy_method"] == "estimate" for r in run.history)


def test_resume_after_a_kill_ends_exactly_like_an_uninterrupted_run(tmp_path):
    whole = evolution(tmp_path / "whole").run_to_end()
    with pytest.raises(KeyboardInterrupt):
        evolution(tmp_path / "killed").run_to_end(stop_after=7)
    resumed_evo = evolution(tmp_path / "killed")
    assert len(resumed_evo.run.history) == 7  # picked up from the checkpoint
    resumed = resumed_evo.run_to_end()
    np.testing.assert_array_equal(resumed.ga_state.best_genome, whole.ga_state.best_genome)
    assert resumed.ga_state.best_fitness == whole.ga_state.best_fitness
    assert without_timing(resumed.history) == without_timing(whole.history)


def test_same_seed_same_search_other_seed_other_search(tmp_path):
    a, b = evolution(tmp_path / "a").run_to_end(), evolution(tmp_path / "b").run_to_end()
    c = evolution(tmp_path / "c", seed=1).run_to_end()
    np.testing.assert_array_equal(a.ga_state.population, b.ga_state.population)
    assert not np.array_equal(a.ga_state.population, c.ga_state.population)


def test_patience_stops_a_stalled_search(tmp_path):
    run = evolution(tmp_path, patience=2, generations=500).run_to_end()
    assert run.stopped == "no improvement in 2 generations" and run.ga_state.generation < 500


@pytest.mark.parametrize("mode", ["pure", "hybrid"])
def test_real_gpt2_search_resumes_identically(tiny_gpt2_search, tmp_path, mode):
    root, model = tiny_gpt2_search

    def make():
        search = build_search(root / "prepared", root / "library", model, fitness_batch_size=2, seed=0, device="cpu")
        genomes, losses, _ = sample_for_surrogate(search, 20, 0.5, np.random.default_rng(0))
        surrogate = Surrogate(SurrogateConfig(search.gene_buckets, 10, steps=20), seed=0)
        surrogate.fit(genomes, losses)
        cfg = EvolveParams(**{**defaults(EvolveParams).__dict__, "population": 6, "generations": 5,
                              "hybrid_every": 2, "hybrid_steps": 2, "hybrid_batch_size": 2, "local_search_every": 3,
                              "local_search_top": 2, "surrogate_every": 2})
        return Evolution(search, cfg, surrogate, (genomes, losses), 0, tmp_path / "ckpt", "fp",
                         dict(device="cpu", rapl_root=tmp_path / "no-rapl"), mode=mode)

    with pytest.raises(KeyboardInterrupt):
        make().run_to_end(stop_after=3)
    evo = make()
    resumed = evo.run_to_end()
    best_true = population_losses(evo.search.model, resumed.ga_state.best_genome[None], evo.search.batch)[0]
    assert resumed.ga_state.best_fitness == pytest.approx(best_true, rel=1e-6)
    (tmp_path / "ckpt" / "state.json").unlink()
    whole = make().run_to_end()
    np.testing.assert_array_equal(resumed.ga_state.best_genome, whole.ga_state.best_genome)
    assert resumed.ga_state.best_fitness == whole.ga_state.best_fitness


def test_a_kill_between_checkpoint_files_leaves_the_previous_checkpoint_usable(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        evolution(tmp_path).run_to_end(stop_after=4)
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["continuous-4.safetensors", "state.json",
                                                      "surrogate-4.safetensors"]
    (ckpt / "surrogate-5.safetensors").write_bytes(b"half-written")  # killed before state.json moved on
    evo = evolution(tmp_path)
    assert len(evo.run.history) == 4
    evo.run_to_end()
    assert not (ckpt / "surrogate-5.safetensors").exists() or "surrogate-5" in (ckpt / "state.json").read_text()


def test_the_surrogate_is_not_retrained_when_no_generation_would_use_it(tmp_path):
    evo = evolution(tmp_path, generations=20, surrogate_every=5)
    fits = []
    fit = evo.surrogate.fit
    evo.surrogate.fit = lambda *a, **k: fits.append(evo.run.ga_state.generation) or fit(*a, **k)
    evo.run_to_end()
    assert fits == [5, 10, 15]  # generation 20 is the last


def test_checkpoint_writing_is_metered_apart_from_the_search(tmp_path):
    import time

    evo = evolution(tmp_path, generations=8)
    write = evo.checkpoints.save

    def slow_write(*args):
        end = time.process_time() + 0.3  # burn CPU, which the `estimate` method charges
        while time.process_time() < end:
            pass
        write(*args)

    evo.checkpoints.save = slow_write
    with EnergyMeter(**evo.meter_options) as whole:
        run = evo.run_to_end()
    burned_wh = 9 * 0.3 * 10.0 / 3600  # nine generations (0..8) at the default 10 W per core
    assert evo.cost.checkpoint_energy_j / 3600 >= burned_wh
    # the search's figure leaves the burn out, however loaded the machine (its CPU time moves with load)
    assert run.history[-1]["energy_wh"] <= whole.reading.energy_wh - burned_wh


def test_every_flop_the_search_computes_is_charged(tmp_path):
    evo = evolution(tmp_path, generations=12, surrogate_every=4, local_search_every=5)
    expected = {"predict": 0, "fit": 0}
    predict, fit = evo.surrogate.predict, evo.surrogate.fit

    def counted_predict(genomes):
        expected["predict"] += evo.surrogate.inference_flops(len(genomes))
        return predict(genomes)

    def counted_fit(genomes, losses, **kw):
        expected["fit"] += evo.surrogate.training_flops(len(genomes))
        return fit(genomes, losses, **kw)

    evo.surrogate.predict, evo.surrogate.fit = counted_predict, counted_fit
    run = evo.run_to_end()
    evaluated = 1000 * evo.search.evaluator.computed - 1000 * 60  # less the surrogate's pretraining genomes
    assert expected["predict"] > 0 and expected["fit"] > 0
    assert run.history[-1]["flops"] == evaluated + expected["predict"] + expected["fit"]


def test_an_uncertain_child_gets_its_true_evaluation_before_a_confidently_mediocre_one(tmp_path):
    from types import SimpleNamespace

    evo = evolution(tmp_path, population=4, full_eval_fraction=0.25)  # one true evaluation per generation
    mean, spread = np.array([0.0, 0.3, 1.0, 1.0]), np.array([0.0, 0.5, 0.0, 0.0])
    evo.surrogate = SimpleNamespace(predict=lambda g: (mean[:len(g)], spread[:len(g)]),
                                    inference_flops=lambda n: 0, to_loss=lambda s: np.exp(s))
    def unseen_children(seed):
        children = np.random.default_rng(seed).integers(0, M, size=(4, N))
        children[:, 0] = 20  # clear of the planted broken gene
        assert not any(tuple(c) in evo.search.evaluator.cache for c in children.tolist())
        return children

    _, chosen = evo._score(unseen_children(7), np.random.default_rng(0))
    assert chosen.tolist() == [False, True, False, False]  # 0.3 - 0.5 beats 0.0 - 0.0
    spread[:] = 0.0
    _, chosen = evo._score(unseen_children(8), np.random.default_rng(0))
    assert chosen.tolist() == [True, False, False, False]  # no spread (one member): the best mean


# --- the controls: random search, the GA without surrogate, a fixed body ---------------------

def control(tmp_path, strategy, budget, seed=0, **overrides):
    from clso.search.evolve import Evolution

    cfg = defaults(EvolveParams)
    cfg = EvolveParams(**{**cfg.__dict__, "population": 24, "generations": 25, "patience": 100,
                          "local_search_every": 10, "surrogate_every": 5, **overrides})
    return Evolution(planted_search(), cfg, None, None, seed, tmp_path / "ckpt", "fp",
                     dict(device="cpu", rapl_root=tmp_path / "no-rapl"), strategy=strategy, budget=budget)


def test_random_search_follows_the_ga_evaluation_schedule_and_loses_to_it(tmp_path):
    from clso.search.evolve import Budget

    for seed in range(3):
        ga_run = evolution(tmp_path / f"ga{seed}", seed=seed)
        ga_result = ga_run.run_to_end()
        pretraining = 60  # the surrogate's genomes, truly evaluated before the search
        schedule = tuple(pretraining + r["true_evaluations"] for r in ga_result.history)
        rnd = control(tmp_path / f"random{seed}", "random", Budget(evaluations=schedule), seed=seed).run_to_end()
        assert [r["true_evaluations"] for r in rnd.history] == list(schedule)
        assert rnd.surrogate_predictions == 0 and len(rnd.history) == len(schedule)
        # the GA's best is found with its pretraining's help; random search had the same number of evaluations
        assert ga_result.ga_state.best_fitness - OPTIMUM < 0.6 * (rnd.ga_state.best_fitness - OPTIMUM)


def test_the_ga_without_surrogate_spends_its_flop_budget_on_true_evaluations_only(tmp_path):
    from clso.search.evolve import Budget

    evo = control(tmp_path, "no_surrogate", Budget(flops=300_000), generations=10)  # the FLOPs, not 10 generations
    run = evo.run_to_end()
    assert run.stopped == "FLOP budget spent" and run.surrogate_predictions == 0 and run.ga_state.generation > 10
    assert 300_000 <= run.history[-1]["flops"] < 300_000 + 1000 * 24 + 1000 * 10 * 5  # at most one generation over
    assert run.history[-1]["flops"] == 1000 * evo.search.evaluator.computed  # every FLOP is a true evaluation's
    assert run.true_evaluations == evo.search.evaluator.computed
    assert all(r["energy_method"] == "estimate" for r in run.history)
    assert all(a["energy_wh"] <= b["energy_wh"] for a, b in zip(run.history, run.history[1:]))


def test_a_control_is_told_apart_from_the_ga():
    from clso.search.evolve import Evolution

    search, cfg = planted_search(), defaults(EvolveParams)
    with pytest.raises(ValueError, match="surrogate"):
        Evolution(search, cfg, None, None, 0, "ckpt", "fp", {}, strategy="ga")
    with pytest.raises(ValueError, match="pure mode"):
        Evolution(search, cfg, None, None, 0, "ckpt", "fp", {}, strategy="fixed_body")


def test_random_search_stops_where_a_shorter_schedule_ends(tmp_path):
    from clso.search.evolve import Budget

    rnd = control(tmp_path, "random", Budget(evaluations=(10, 20, 25, 25, 40))).run_to_end()
    assert [r["true_evaluations"] for r in rnd.history] == [10, 20, 25, 25, 40]
    assert rnd.stopped == "evaluation schedule done"


def test_the_fixed_body_gets_exactly_the_adam_steps_of_the_hybrid_run(tiny_gpt2_search, tmp_path, monkeypatch):
    from clso.search.evolve import Evolution

    root, model = tiny_gpt2_search
    steps = []
    adam_step = torch.optim.Adam.step
    def counted(self, *a, **k):
        if type(self) is torch.optim.Adam:  # the hybrid phases' Adam, not the surrogate's AdamW (a subclass)
            steps.append(1)
        return adam_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    cfg = EvolveParams(**{**defaults(EvolveParams).__dict__, "population": 6, "generations": 7,
                          "hybrid_every": 2, "hybrid_steps": 3, "hybrid_batch_size": 2, "local_search_every": 3,
                          "local_search_top": 2, "surrogate_every": 2})

    def run(strategy, folder, budget=None):
        from clso.search.evolve import Budget

        search = build_search(root / "prepared", root / "library", model, fitness_batch_size=2, seed=0, device="cpu")
        surrogate, pretraining = None, None
        if strategy == "ga":
            genomes, losses, _ = sample_for_surrogate(search, 20, 0.5, np.random.default_rng(0))
            surrogate = Surrogate(SurrogateConfig(search.gene_buckets, 10, steps=20), seed=0)
            surrogate.fit(genomes, losses)
            pretraining = (genomes, losses)
        evo = Evolution(search, cfg, surrogate, pretraining, 0, tmp_path / folder, "fp",
                        dict(device="cpu", rapl_root=tmp_path / "no-rapl"), strategy=strategy, budget=budget or Budget(), mode="hybrid")
        steps.clear()
        return evo, evo.run_to_end(), len(steps)

    from clso.search.evolve import Budget

    ga, ga_run, ga_steps = run("ga", "ga")
    fixed, fixed_run, fixed_steps = run("fixed_body", "fixed", Budget(generations=ga_run.ga_state.generation))
    assert fixed_steps == ga_steps == 3 * 3  # generations 2, 4 and 6
    # the GA without surrogate: the GA's search FLOPs (Adam's aside) and more, and exactly its Adam phases,
    # each at the share of the budget the GA had spent when it ran it
    spent = ga.cost.search_flops
    assert ga.cost.adam_flops > 0 and spent == ga.cost.flops - ga.cost.adam_flops and len(ga_run.adam_at) == 3
    shares = tuple(f / spent for f in ga_run.adam_at)
    budget = Budget(flops=spent, adam_at=shares)
    nosur, nosur_run, nosur_steps = run("no_surrogate", "no_surrogate", budget)
    assert nosur_steps == ga_steps and nosur.adam_phases == ga.adam_phases == 3
    assert nosur_run.stopped == "FLOP budget spent" and nosur.cost.search_flops >= budget.flops
    assert nosur.cost.flops - nosur.cost.search_flops == nosur.cost.adam_flops > 0  # charged, not counted in the budget
    assert all(at >= share * budget.flops for at, share in zip(nosur_run.adam_at, shares))
    assert nosur_run.history[-1]["flops"] == nosur.cost.flops
    from clso.model.flops import backward_flops, forward_flops

    genome, gpt = fixed_run.ga_state.best_genome, fixed.search.config.gpt2()
    per_layer = fixed.search.model.linear_flops(genome)
    phase = 3 * (forward_flops(gpt, 16, 2, per_layer) + backward_flops(gpt, 16, 2, per_layer, train_linears=False))
    assert len({tuple(r) for r in fixed_run.ga_state.population.tolist()}) == 1
    assert fixed_run.ga_state.best_genome.tolist() == fixed_run.ga_state.population[0].tolist()
    assert fixed_run.surrogate_predictions == 0 and fixed_run.true_evaluations == 1 + 3  # once, and after each phase
    # charged: its true evaluations and three phases of Adam, nothing else
    assert fixed_run.history[-1]["flops"] == fixed.search.evaluator.flops + 3 * phase
    assert fixed_run.history[-1]["energy_method"] == "estimate"
    assert fixed_run.ga_state.best_fitness < fixed_run.history[0]["best_loss"]  # Adam alone improved it


def test_random_search_in_hybrid_mode_spends_exactly_its_schedule(tiny_gpt2_search, tmp_path):
    from clso.search.evolve import Budget, Evolution

    root, model = tiny_gpt2_search
    cfg = EvolveParams(**{**defaults(EvolveParams).__dict__, "population": 6, "generations": 7,
                          "hybrid_every": 2, "hybrid_steps": 2, "hybrid_batch_size": 2})
    schedule = (8, 12, 16, 20, 30, 31, 40, 44)

    def make(folder):
        search = build_search(root / "prepared", root / "library", model, fitness_batch_size=2, seed=0, device="cpu")
        return Evolution(search, cfg, None, None, 0, tmp_path / folder, "fp", dict(device="cpu", rapl_root=tmp_path / "x"),
                         strategy="random", budget=Budget(evaluations=schedule), mode="hybrid")

    run = make("whole").run_to_end()
    assert [r["true_evaluations"] for r in run.history] == list(schedule)  # re-scoring the best after each phase included
    with pytest.raises(KeyboardInterrupt):
        make("killed").run_to_end(stop_after=3)
    resumed = make("killed").run_to_end()
    assert without_timing(resumed.history) == without_timing(run.history)
    np.testing.assert_array_equal(resumed.ga_state.best_genome, run.ga_state.best_genome)


def test_a_control_needs_its_budget_and_never_resumes_another_runs_checkpoint(tmp_path):
    from clso.search.evolve import Budget

    for strategy, needed in (("random", "evaluations"), ("no_surrogate", "flops")):
        with pytest.raises(ValueError, match=needed):
            control(tmp_path, strategy, Budget())
    with pytest.raises(KeyboardInterrupt):
        control(tmp_path, "random", Budget(evaluations=(5, 10, 15, 20, 25))).run_to_end(stop_after=2)
    other = control(tmp_path, "no_surrogate", Budget(flops=50_000))  # same folder, same fingerprint
    assert other.run.history == []  # started afresh
    again = control(tmp_path, "random", Budget(evaluations=(5, 10, 15, 20, 30)))  # another budget
    assert again.run.history == []


def test_totals_keep_the_gpu_and_cpu_parts_apart():
    from clso.energy import EnergyReading
    from clso.search.evolve import Totals

    gpu = EnergyReading(energy_wh=0.3, method="nvml+estimate", wall_s=10.0, cpu_s=9.0, cpu_wh=0.1,
                        cpu_method="estimate", gpu_wh=0.2, gpu_method="nvml")
    cpu = EnergyReading(energy_wh=0.05, method="rapl", wall_s=2.0, cpu_s=2.0, cpu_wh=0.05, cpu_method="rapl")
    totals = Totals().plus(gpu).plus(cpu)
    assert totals.by_device() == {"cpu_wh": 0.15, "cpu_method": "estimate|rapl", "gpu_wh": 0.2, "gpu_method": "nvml"}
    assert totals.energy_j == pytest.approx((totals.cpu_j + totals.gpu_j))
    assert Totals().plus(cpu).by_device() == {}  # CPU-only: no parts, as EnergyReading.as_metrics gives none


def test_the_no_surrogate_budget_is_clsos_search_and_surrogate_flops_without_adam(tmp_path, monkeypatch):
    from clso.io import write_json_atomic
    from clso.record import Record
    from stages.evolve import _budget
    from stages.paths import Contestant, detail

    monkeypatch.chdir(tmp_path)
    write_json_atomic(detail("surrogate"), {"genomes": 10, "evaluation": {"flops": 300}, "training": {"flops": 20}})
    search = {"energy_wh": 1.0, "method": "estimate", "wall_s": 1.0, "flops": 10_000, "true_evaluations": 50}
    for mode, adam in (("hybrid", 4_000), ("pure", 0)):
        clso = Contestant("evolve", mode, 5)
        at = [1_500, 6_000] if adam else []
        Record(clso.name, "clso", "CLSO", 5.0, 5.0, {"search": search}, {"loss": "x", "points": []}, (), mode, 5,
               {"adam_phases": len(at), "adam_flops": adam, "adam_at_search_flops": at}).save(clso.record)
        budget = _budget(Contestant("no_surrogate", mode, 5))
        assert budget.flops == 10_000 - adam + 300 + 20
        assert budget.adam_at == ((0.25, 1.0) if adam else None)  # each phase at its share of the GA's 6,000


def test_the_surrogate_holdout_keeps_each_family_on_one_side(tiny_gpt2_search):
    """A mutant and its random ancestor (and every sibling) fall on the same side of the holdout: a
    near-duplicate of a training genome never flatters the held-out score."""
    from clso.search.problem import split_by_family

    root, model = tiny_gpt2_search
    search = build_search(root / "prepared", root / "library", model, fitness_batch_size=2, seed=0, device="cpu")
    parents = {}
    real_mutate = ga.mutate

    def mutate(parent, *args):  # record each mutant's parent
        child = real_mutate(parent, *args)
        parents.setdefault(tuple(child.tolist()), tuple(parent.tolist()))
        return child

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ga, "mutate", mutate)
        genomes, losses, families = sample_for_surrogate(search, 40, 0.5, np.random.default_rng(0))
    assert len(genomes) == 40 and len(np.unique(families)) < 40  # some random genomes have mutants
    family_of = dict(zip(map(tuple, genomes.tolist()), families.tolist()))
    mutants = [g for g in family_of if g in parents and parents[g] in family_of]
    assert mutants and all(family_of[g] == family_of[parents[g]] for g in mutants)
    held, kept = split_by_family(families, 8, np.random.default_rng(1))
    assert 0 < len(held) <= 8 and sorted([*held, *kept]) == list(range(40))
    assert not set(families[held].tolist()) & set(families[kept].tolist())
    side = {g: i in set(held.tolist()) for i, g in enumerate(map(tuple, genomes.tolist()))}
    assert all(side[g] == side[parents[g]] for g in mutants)


def test_head_only_trains_the_head_and_final_layernorm_with_no_gradient_through_the_body(tiny_gpt2_search, tmp_path):
    """The truly backprop-free hybrid: the fixed body's genome and CLSO's phases, but the body (and the
    embeddings' input side) run without a graph; only the tied head and ln_f move."""
    from clso.model.flops import forward_flops
    from clso.search.evolve import Budget, Evolution

    root, model = tiny_gpt2_search
    cfg = EvolveParams(**{**defaults(EvolveParams).__dict__, "population": 6, "generations": 4, "hybrid_every": 2,
                          "hybrid_steps": 3, "hybrid_batch_size": 2})

    def evolution(strategy):
        search = build_search(root / "prepared", root / "library", model, fitness_batch_size=2, seed=0, device="cpu")
        return Evolution(search, cfg, None, None, 0, tmp_path / strategy, "fp",
                         dict(device="cpu", rapl_root=tmp_path / "no-rapl"), strategy=strategy,
                         budget=Budget(generations=4), mode="hybrid")

    evo = evolution("head_only")
    gpt = evo.search.model.gpt2
    before = {k: v.clone() for k, v in evo.search.model.continuous_state().items()}
    graphs = []
    for module in (gpt.transformer.wte, gpt.transformer.wpe, *gpt.transformer.h):
        module.register_forward_hook(lambda m, args, out: graphs.append(
            (out[0] if isinstance(out, tuple) else out).requires_grad))
    run = evo.run_to_end()
    assert evo.adam_phases == 2 and graphs and not any(graphs)  # no graph through the body, ever
    after = evo.search.model.continuous_state()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}, moved
    fixed = evolution("fixed_body")
    fixed_run = fixed.run_to_end()
    assert run.ga_state.best_genome.tolist() == fixed_run.ga_state.best_genome.tolist()  # the same body
    genome, config = run.ga_state.best_genome, evo.search.config
    head = 2 * config.n_embd * config.vocab_size * 16 * 2
    phase = 3 * (forward_flops(config.gpt2(), 16, 2, evo.search.model.linear_flops(genome)) + 2 * head)
    assert run.history[-1]["flops"] == evo.search.evaluator.flops + 2 * phase
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from clso.search.evolve import head_phase
    from tests.conftest import counted_flops

    charged = {}
    with sdpa_kernel(SDPBackend.MATH):  # what PyTorch counts of one phase: the charge, and the formula above
        counted = counted_flops(lambda: charged.setdefault("flops", head_phase(evo.search, genome, cfg,
                                                                               np.random.default_rng(0))))
    assert charged["flops"] == counted == phase
    with pytest.raises(ValueError, match="pure mode"):
        Evolution(evo.search, cfg, None, None, 0, tmp_path / "p", "fp", {}, strategy="head_only",
                  budget=Budget(generations=4), mode="pure")


def test_ngopt_gets_the_ga_true_evaluations_beats_its_start_and_resumes_identically(tmp_path):
    from clso.search.evolve import Budget

    ga_result = evolution(tmp_path / "ga", seed=0).run_to_end()
    schedule = tuple(60 + r["true_evaluations"] for r in ga_result.history)  # with the surrogate's 60 genomes
    ng = control(tmp_path / "ng", "ngopt", Budget(evaluations=schedule)).run_to_end()
    assert [r["true_evaluations"] for r in ng.history] == list(schedule)  # the GA's, generation by generation
    assert ng.surrogate_predictions == 0 and ng.history[-1]["best_loss"] < ng.history[0]["best_loss"]
    assert ng.segment["index"] == 0 and sum(ng.segment["batches"]) == len(ng.segment["told"]) > 0
    assert len(ng.algorithms) == 1 and not ng.algorithms[0].startswith("NGOpt")  # the algorithm NGOpt picked
    # every genome asked is counted, the repeats of known genomes (no true evaluation) among them
    assert ng.asks == len(ng.segment["told"]) > schedule[-1] - 60
    killed = control(tmp_path / "ng2", "ngopt", Budget(evaluations=schedule))
    with pytest.raises(KeyboardInterrupt):
        killed.run_to_end(stop_after=7)
    saved = json.loads((tmp_path / "ng2" / "ckpt" / "state.json").read_text())
    assert saved["algorithms"] == ng.algorithms and 0 < saved["asks"] < ng.asks
    resumed = control(tmp_path / "ng2", "ngopt", Budget(evaluations=schedule)).run_to_end()  # replays nevergrad
    assert without_timing(resumed.history) == without_timing(ng.history)
    assert resumed.ga_state.best_genome.tolist() == ng.ga_state.best_genome.tolist()
    assert resumed.algorithms == ng.algorithms and resumed.asks == ng.asks  # kept in the checkpoint
