"""Stages `evolve` (the CLSO genetic search with its surrogate) and its controls `random`,
`no_surrogate` and `fixed_body`: one contestant per mode and seed of params.yaml's grid, each
resumable after any generation. A control's budget is read from the CLSO run of its mode and seed."""

import math
from dataclasses import asdict
from pathlib import Path

import typer

from clso import ClsoError
from clso.context import resolve_precision, setup
from clso.data.tokens import final_losses, split_targets
from clso.energy import EnergyMeter
from clso.io import atomic_dir, read_curve, read_json, write_csv_atomic
from clso.model.bound import frozen_head_bound
from clso.model.library import Library
from clso.params import MODES, load_params
from clso.plots import evolution_png
from clso.progress import progress_bar
from clso.record import Record
from clso.search.evolve import FIXED, HISTORY_FIELDS, Budget, Evolution
from clso.search.problem import build_search
from clso.search.surrogate import Surrogate
from clso.search.workers import search_pool
from stages.common import MODE_OPTION, PARAMS_OPTION, SEED_OPTION, app, fingerprint, stage
from stages.paths import LIBRARY, PREPARED, SURROGATE, Contestant, detail

CURVE_LOSS = "best fitness (train batch)"


def _fingerprint(p, me: Contestant, files, precision: str) -> str:
    """A checkpoint resumes only under the same params, contestant, inputs, the precision `auto` gave, and code."""
    evolve = {k: v for k, v in asdict(p.evolve).items() if k not in ("workers", "address")}  # a resume may change them
    return fingerprint({**{k: asdict(getattr(p, k)) for k in ("base", "model", "fitness")}, "evolve": evolve,
                        "contestant": asdict(me), "precision": precision}, files, "stages.evolve")


def _budget(me: Contestant) -> Budget:
    """A control's budget, matched to the CLSO run of its mode and seed and to all CLSO spent on it."""
    strategy = me.strategy
    if strategy == "ga":
        return Budget()
    clso = me.clso()
    if strategy in FIXED:  # the same generations, so the same Adam phases
        return Budget(generations=Record.load(clso.record).details["generations"])
    surrogate = read_json(detail("surrogate"))
    if strategy in ("random", "ngopt"):  # the surrogate's pretraining genomes were true evaluations too
        return Budget(evaluations=tuple(surrogate["genomes"] + int(row["true_evaluations"])
                                        for row in read_curve(clso.curve)))
    record = Record.load(clso.record)  # the GA without surrogate: its search FLOPs, its Adam steps aside
    search_flops = record.costs["search"]["flops"] - record.details["adam_flops"]
    adam_at = tuple(f / search_flops for f in record.details["adam_at_search_flops"]) if me.mode == "hybrid" else None
    return Budget(flops=search_flops + surrogate["evaluation"]["flops"] + surrogate["training"]["flops"], adam_at=adam_at)


def _evolution(p, me: Contestant, device) -> tuple[Evolution, Budget]:
    """The search of `me`, resumed from its checkpoint when one of the same fingerprint is there."""
    budget = _budget(me)  # before any work: a control needs its CLSO run
    search = build_search(PREPARED, LIBRARY, p.model, fitness_batch_size=p.fitness.batch_size, seed=p.base.seed,
                          device=device, precision=resolve_precision(p.fitness.precision, device))
    surrogate, pretraining, inputs = None, None, [search.data.meta_file, LIBRARY / Library.MANIFEST]
    if me.strategy == "ga":
        surrogate, genomes, losses = Surrogate.load(SURROGATE, device)
        if surrogate.config.gene_buckets != search.gene_buckets or surrogate.config.library_size != search.library.size:
            raise ClsoError(f"{SURROGATE} was trained for another genome layout; run `dvc repro surrogate`")
        pretraining, inputs = (genomes, losses), [*inputs, SURROGATE / Surrogate.WEIGHTS]
    evolution = Evolution(search, p.evolve, surrogate, pretraining, me.seed, me.checkpoints,
                          _fingerprint(p, me, inputs, search.precision), p.base.meter_options(device),
                          strategy=me.strategy, budget=budget, mode=me.mode)
    return evolution, budget


def _run(p, me: Contestant, evolution: Evolution):
    """Generations until a stop, with a progress bar, the true evaluations on Ray actors with evolve.workers."""
    search, resumed_at = evolution.search, len(evolution.run.history)
    pool = None
    try:
        pool = search_pool(search, p.evolve.workers, p.evolve.address or None, evolution.meter_options)
        with progress_bar() as bar:
            task = bar.add_task(me.name, total=evolution.generation_limit + 1, completed=resumed_at,
                                info="resumed" if resumed_at else "")

            def show(run):
                row = run.history[-1]
                bar.update(task, completed=len(run.history),
                           info=f"best {row['best_loss']:.4f}  true {row['true_evaluations']}  "
                                f"predicted {row['surrogate_predictions']}  {row['energy_wh']:.4f} Wh")

            return evolution.run_to_end(on_generation=show)
    finally:
        if pool is not None:
            pool.close()


def _scores(p, me: Contestant, evolution: Evolution, device) -> tuple[float, float, dict, dict | None]:
    """The best genome's val and test loss and, in pure mode, the frozen-head bound: charged to no one."""
    search = evolution.search
    model = search.model
    model.set_genome(evolution.run.ga_state.best_genome)
    with EnergyMeter(**evolution.meter_options) as meter:
        val, test = final_losses(model, search.data, p.model.block_size, device)
        bound = None
        if me.mode == "pure":  # nothing continuous trained: the frozen head limits every body
            gpt = model.gpt2
            bound = frozen_head_bound(gpt.lm_head.weight, gpt.transformer.ln_f.weight, gpt.transformer.ln_f.bias,
                                      split_targets(search.data.tokens("val"), p.model.block_size))
    return val, test, meter.reading.as_metrics(), bound


def _record(p, me: Contestant, evolution: Evolution, budget: Budget, scores, device) -> Record:
    run, cost, search = evolution.run, evolution.cost, evolution.search
    val, test, final_evaluation, bound = scores
    last, total = run.history[-1], run.true_evaluations + run.surrogate_predictions
    charged_with = ["library"] + (["surrogate_evaluation", "surrogate_training"] if me.strategy == "ga" else [])
    if search.library.manifest["family_counts"].get("svd"):  # its matrices came from the trained baseline
        charged_with.append("baseline_training")
    # the workers of the last segment; what died and what shard boundaries cost, over all segments
    workers = {"workers": p.evolve.workers, "workers_replaced": cost.workers_replaced,
               "workers_extra_flops": cost.workers_extra_flops} if p.evolve.workers or cost.workers_replaced \
        or cost.workers_extra_flops else {}
    allowed = {k: v for k, v in asdict(budget).items() if v is not None and k != "adam_at"}
    if budget.evaluations:  # the schedule by its total
        allowed["evaluations"] = budget.evaluations[-1]
    return Record(
        me.name, me.kind, me.label, val, test,
        {"search": {"energy_wh": last["energy_wh"], "method": last["energy_method"], **cost.by_device(),
                    "wall_s": last["wall_s"], "flops": last["flops"], "true_evaluations": run.true_evaluations}},
        {"loss": CURVE_LOSS, "points": [{"loss": r["best_loss"], "energy_wh": r["energy_wh"], "flops": r["flops"],
                                         "wall_s": r["wall_s"], "step": r["generation"]} for r in run.history]},
        tuple(charged_with), me.mode, me.seed,
        {"strategy": me.strategy, **({"budget": allowed} if allowed else {}),
         **({"algorithms": run.algorithms, "asks": run.asks} if me.strategy == "ngopt" else {}),
         "generations": run.ga_state.generation, "adam_phases": evolution.adam_phases,
         "adam_flops": cost.adam_flops, "adam_at_search_flops": run.adam_at, "stopped": run.stopped,
         "best_fitness_loss": run.ga_state.best_fitness, "surrogate_predictions": run.surrogate_predictions,
         "evaluations_saved_share": round(run.surrogate_predictions / total, 4) if total else 0.0,
         "device": str(device), "precision": search.precision, **workers,
         **({"frozen_head_bound": {"val_loss": bound["loss"], "val_ppl": bound["ppl"], "solver_gap": bound["solver_gap"],
                                   "distinct_targets": bound["distinct_targets"]}} if bound else {})},
        # writing checkpoints is metered apart and charged to no one (the baseline writes none)
        {"final_scores": final_evaluation, "checkpoints": {"energy_wh": cost.checkpoint_energy_j / 3600,
                                                          "method": last["energy_method"], "wall_s": cost.checkpoint_wall_s}})


def run_search(stage_name: str, mode: str, seed: int | None, params: Path) -> None:
    """Run one contestant's search from where its checkpoint left it; write its model, record, curve and figure."""
    modes = ("hybrid",) if stage_name in FIXED else MODES
    if mode not in modes:
        raise ClsoError(f"--mode {mode}: not valid for {stage_name}; valid: {', '.join(modes)}")
    p = load_params(params)
    me = Contestant(stage_name, mode, p.base.seed if seed is None else seed)
    device = setup(p.base)
    evolution, budget = _evolution(p, me, device)
    run = _run(p, me, evolution)
    scores = _scores(p, me, evolution, device)
    search = evolution.search
    with atomic_dir(me.model_dir) as tmp:
        search.model.save(tmp, fitness_loss=run.ga_state.best_fitness, name=me.name, mode=me.mode)
    _record(p, me, evolution, budget, scores, device).save(me.record)
    write_csv_atomic(me.curve, HISTORY_FIELDS, run.history)
    evolution_png(run.history, me.figure, f"{me.name} ({me.label}): P={p.evolve.population}, "
                                          f"M={search.library.size}, {search.genome_length} genes",
                  uniform_loss=math.log(search.config.vocab_size))
    val, bound = scores[0], scores[3]
    print(f"{me.name}: {run.stopped} after generation {run.ga_state.generation}; best fitness "
          f"{run.ga_state.best_fitness:.4f}, val loss {val:.4f} (ppl {math.exp(val):.1f}); "
          f"{run.true_evaluations} true evaluations, {run.surrogate_predictions} predictions")
    if bound:
        print(f"{me.name}: no body can bring the frozen head's val loss below {bound['loss']:.4f} "
              f"(ppl {bound['ppl']:.1f})")


SECTIONS = ("base", "model", "fitness", "evolve")


@stage("evolve", sections=SECTIONS)
def evolve(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """CLSO: the genetic search with its pretrained surrogate. Checkpoints after every generation in
    checkpoints/search/evolve/MODE-SEED (a killed run resumes); writes models/search/evolve/MODE-SEED/,
    its record metrics/detail/contestants/evolve@MODE-SEED.json and plots/search/evolve/MODE-SEED.{csv,png}."""
    run_search("evolve", mode, seed, params)


@stage("random", sections=SECTIONS)
def random_search(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """Control: random genomes, as many true evaluations per generation as `evolve` of the same mode
    and seed spent (its surrogate's pretraining included). Outputs as `evolve`'s, under random/."""
    run_search("random", mode, seed, params)


@stage("no_surrogate", sections=SECTIONS)
def no_surrogate(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """Control: the GA with every child truly evaluated, until it has spent the search FLOPs of `evolve`
    of the same mode and seed (its Adam steps aside) plus its surrogate's; in hybrid mode it gets exactly
    that run's Adam phases, each at the same share of the budget. Outputs as `evolve`'s, under no_surrogate/."""
    run_search("no_surrogate", mode, seed, params)


@stage("fixed_body", sections=SECTIONS)
def fixed_body(mode: str = typer.Option("hybrid", "--mode", help="hybrid only"), seed: int = SEED_OPTION,
               params: Path = PARAMS_OPTION) -> None:
    """Control (hybrid): one seeded random genome, never searched, with exactly the Adam phases of
    `evolve` of the same seed. Outputs as `evolve`'s, under fixed_body/."""
    run_search("fixed_body", mode, seed, params)


@stage("ngopt", sections=SECTIONS)
def ngopt(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """The arena's standard discrete optimizer: nevergrad's NGOpt on the genome through ask and tell, as
    many true evaluations per generation as `evolve` of the same mode and seed spent (its surrogate's
    pretraining included), and in hybrid mode its Adam phases. Outputs as `evolve`'s, under ngopt/."""
    run_search("ngopt", mode, seed, params)


@stage("head_only", sections=SECTIONS)
def head_only(mode: str = typer.Option("hybrid", "--mode", help="hybrid only"), seed: int = SEED_OPTION,
              params: Path = PARAMS_OPTION) -> None:
    """The arena's backprop-free hybrid: the fixed body of `fixed_body` with exactly the Adam phases of
    `evolve` of the same seed, each reaching only the tied head (its output side) and the final
    LayerNorm: no gradient passes through the body. Outputs as `evolve`'s, under head_only/."""
    run_search("head_only", mode, seed, params)


if __name__ == "__main__":
    app(prog_name="python -m stages.evolve")  # COMMAND: evolve, random, no_surrogate, fixed_body, ngopt or head_only
