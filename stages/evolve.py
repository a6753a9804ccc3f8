"""Stages `evolve` (the CLSO genetic search with its surrogate) and its controls `random`,
`no_surrogate` and `fixed_body`: one variant per mode and seed of params.yaml's grid, each
resumable after any generation. A control's budget is read from the CLSO run of its mode and seed."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import typer
from safetensors.torch import load_file, save_file

from clso import ClsoError
from clso.context import resolve_precision, setup
from clso.data.tokens import split_loss, split_targets
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_csv_atomic, write_json_atomic
from clso.model.bound import frozen_head_bound
from clso.params import MODES, load_params
from clso.plots import evolution_png
from clso.progress import progress_bar
from clso.search.evolve import HISTORY_FIELDS, Budget, Evolution
from clso.search.problem import build_search
from clso.search.surrogate import Surrogate, SurrogateConfig
from clso.search.workers import search_pool
from stages.common import PARAMS_OPTION, app, fingerprint, read_curve, read_json, stage
from stages.variants import Variant

SURROGATE_DIR = Path("models/surrogate")
VAL_BATCH = 16


def _load_surrogate(device) -> tuple[Surrogate, np.ndarray, np.ndarray]:
    try:
        config = json.loads((SURROGATE_DIR / "surrogate.json").read_text())
        data = json.loads((SURROGATE_DIR / "data.json").read_text())
        model = Surrogate(SurrogateConfig(**{**config, "gene_buckets": tuple(config["gene_buckets"])}), device=device)
        model.load_state_dict(load_file(str(SURROGATE_DIR / "surrogate.safetensors")))
    except FileNotFoundError as e:
        raise ClsoError(f"{e.filename}: not found; run `dvc repro surrogate` first") from None
    except Exception as e:
        raise ClsoError(f"{SURROGATE_DIR}: unreadable surrogate ({type(e).__name__}); "
                        "re-create it with `dvc repro -f surrogate`") from None
    return model, np.array(data["genomes"], dtype=np.int64), np.array([float(x) for x in data["losses"]])


def _fingerprint(p, variant: Variant, files, precision: str) -> str:
    """A checkpoint resumes only under the same params, variant, inputs, the precision `auto` gave, and code."""
    evolve = {k: v for k, v in asdict(p.evolve).items() if k not in ("workers", "address")}  # a resume may change them
    return fingerprint({**{k: asdict(getattr(p, k)) for k in ("base", "model", "fitness")}, "evolve": evolve,
                        "variant": asdict(variant), "precision": precision}, files, "stages.evolve")


def _budget(variant: Variant, surrogate: dict) -> Budget:
    """A control's budget, matched to the CLSO run of its mode and seed and to all CLSO spent on it."""
    if variant.strategy == "ga":
        return Budget()
    clso = variant.clso()
    if variant.strategy == "random":  # the surrogate's pretraining genomes were true evaluations too
        return Budget(evaluations=tuple(surrogate["genomes"] + int(row["true_evaluations"])
                                        for row in read_curve(clso.curve)))
    metrics = read_json(clso.metrics)
    if variant.strategy == "no_surrogate":
        return Budget(flops=metrics["flops"] + surrogate["evaluation"]["flops"] + surrogate["training"]["flops"])
    return Budget(generations=metrics["generations"])


def _budget_metrics(budget: Budget) -> dict:
    """What a control was allowed, for its metrics: the evaluation schedule by its total."""
    allowed = {k: v for k, v in asdict(budget).items() if v is not None}
    if budget.evaluations:
        allowed["evaluations"] = budget.evaluations[-1]
    return allowed


def search_variant(stage_name: str, mode: str, seed: int | None, params: Path) -> None:
    """Run one variant's search from where its checkpoint left it; write its model, metrics, curve and figure."""
    modes = ("hybrid",) if stage_name == "fixed_body" else MODES
    if mode not in modes:
        raise ClsoError(f"--mode {mode}: not valid for {stage_name}; valid: {', '.join(modes)}")
    p = load_params(params)
    variant = Variant(stage_name, mode, p.base.seed if seed is None else seed)
    budget = _budget(variant, read_json("metrics/surrogate.json"))  # before any work: a control needs its CLSO run
    device = setup(p.base)
    search = build_search("data/prepared", "models/library", p.model, fitness_batch_size=p.fitness.batch_size,
                          seed=p.base.seed, device=device, precision=resolve_precision(p.fitness.precision, device))
    surrogate, pretraining, inputs = None, None, ["data/prepared/meta.json", "models/library/manifest.json"]
    if variant.strategy == "ga":
        surrogate, genomes, losses = _load_surrogate(device)
        if surrogate.config.gene_buckets != search.gene_buckets or surrogate.config.library_size != search.library.size:
            raise ClsoError("models/surrogate was trained for another genome layout; run `dvc repro surrogate`")
        pretraining, inputs = (genomes, losses), [*inputs, SURROGATE_DIR / "surrogate.safetensors"]
    meter = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    evolution = Evolution(search, p.evolve, surrogate, pretraining, variant.seed, variant.checkpoints,
                          _fingerprint(p, variant, inputs, search.precision), meter, strategy=variant.strategy, budget=budget,
                          mode=variant.mode)
    resumed_at = len(evolution.run.history)
    pool = None
    try:
        pool = search_pool(search, p.evolve.workers, p.evolve.address or None, meter)
        with progress_bar() as bar:
            task = bar.add_task(variant.name, total=evolution.generation_limit + 1, completed=resumed_at,
                                info="resumed" if resumed_at else "")

            def show(run):
                row = run.history[-1]
                bar.update(task, completed=len(run.history),
                           info=f"best {row['best_loss']:.4f}  true {row['true_evaluations']}  "
                                f"predicted {row['surrogate_predictions']}  {row['energy_wh']:.4f} Wh")

            run = evolution.run_to_end(on_generation=show)
    finally:
        if pool is not None:
            pool.close()

    model = search.model
    model.set_genome(run.ga_state.best_genome)
    val_tokens = search.data.tokens("val")
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to neither side
        val = split_loss(model, val_tokens, p.model.block_size, VAL_BATCH, device)
        bound = None
        if variant.mode == "pure":  # nothing continuous trained: the frozen head limits every body
            gpt = model.gpt2
            bound = frozen_head_bound(gpt.lm_head.weight, gpt.transformer.ln_f.weight, gpt.transformer.ln_f.bias,
                                      split_targets(val_tokens, p.model.block_size))
    last, cost = run.history[-1], evolution.cost
    # the workers of the last segment; what died and what shard boundaries cost, over all segments
    workers = {"workers": p.evolve.workers, "workers_replaced": cost.workers_replaced,
               "workers_extra_flops": cost.workers_extra_flops} if p.evolve.workers or cost.workers_replaced \
        or cost.workers_extra_flops else {}
    with atomic_dir(variant.model_dir) as tmp:
        write_json_atomic(tmp / "best_genome.json", {
            "genome": run.ga_state.best_genome.tolist(), "fitness_loss": run.ga_state.best_fitness,
            "library_seed": search.library.seed, "variant": variant.name, "mode": variant.mode,
            "model": asdict(search.config)})
        save_file(model.continuous_state(), str(tmp / "continuous.safetensors"), metadata={"clso": "continuous/1"})
    total = run.true_evaluations + run.surrogate_predictions
    write_json_atomic(variant.metrics, {
        "variant": variant.name, "strategy": variant.strategy, "mode": variant.mode, "seed": variant.seed,
        **({"budget": _budget_metrics(budget)} if variant.strategy != "ga" else {}),
        "generations": run.ga_state.generation, "adam_phases": evolution.adam_phases, "stopped": run.stopped,
        "best_fitness_loss": run.ga_state.best_fitness, "val_loss": val, "val_ppl": math.exp(val),
        "true_evaluations": run.true_evaluations, "surrogate_predictions": run.surrogate_predictions,
        "evaluations_saved_share": round(run.surrogate_predictions / total, 4) if total else 0.0,
        "energy_wh": last["energy_wh"], "method": last["energy_method"], **cost.by_device(), "flops": last["flops"],
        "wall_s": last["wall_s"], "device": str(device), "precision": search.precision,
        **workers,
        # writing checkpoints is metered apart and charged to neither side (the baseline writes none)
        "checkpoint": {"energy_wh": cost.checkpoint_energy_j / 3600, "method": last["energy_method"],
                       "wall_s": cost.checkpoint_wall_s},
        "final_evaluation": final_meter.reading.as_metrics(),
        **({"frozen_head_bound": {"val_loss": bound["loss"], "val_ppl": bound["ppl"], "solver_gap": bound["solver_gap"],
                                  "distinct_targets": bound["distinct_targets"]}} if bound else {}),
    })
    write_csv_atomic(variant.curve, HISTORY_FIELDS, run.history)
    evolution_png(run.history, variant.figure, f"{variant.name} ({variant.label}): P={p.evolve.population}, "
                                               f"M={search.library.size}, {search.genome_length} genes",
                  uniform_loss=math.log(search.config.vocab_size))
    print(f"{variant.name}: {run.stopped} after generation {run.ga_state.generation}; best fitness "
          f"{run.ga_state.best_fitness:.4f}, val loss {val:.4f} (ppl {math.exp(val):.1f}); "
          f"{run.true_evaluations} true evaluations, {run.surrogate_predictions} predictions")
    if bound:
        print(f"{variant.name}: no body can bring the frozen head's val loss below {bound['loss']:.4f} "
              f"(ppl {bound['ppl']:.1f})")


MODE_OPTION = typer.Option("pure", "--mode", help="pure or hybrid (one of params.yaml's grid lists)")
SEED_OPTION = typer.Option(None, "--seed", help="search seed (one of grid.seeds); default base.seed")
SECTIONS = ("base", "model", "fitness", "evolve")


@stage("evolve", sections=SECTIONS)
def evolve(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """CLSO: the genetic search with its pretrained surrogate. Checkpoints after every generation in
    checkpoints/search/evolve/MODE-SEED (a killed run resumes); writes models/search/evolve/MODE-SEED/,
    metrics/search/evolve/MODE-SEED.json and plots/search/evolve/MODE-SEED.{csv,png}."""
    search_variant("evolve", mode, seed, params)


@stage("random", sections=SECTIONS)
def random_search(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """Control: random genomes, as many true evaluations per generation as `evolve` of the same mode
    and seed spent (its surrogate's pretraining included). Outputs as `evolve`'s, under random/."""
    search_variant("random", mode, seed, params)


@stage("no_surrogate", sections=SECTIONS)
def no_surrogate(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """Control: the GA with every child truly evaluated, until it has spent the FLOPs of `evolve` of
    the same mode and seed plus its surrogate's. Outputs as `evolve`'s, under no_surrogate/."""
    search_variant("no_surrogate", mode, seed, params)


@stage("fixed_body", sections=SECTIONS)
def fixed_body(mode: str = typer.Option("hybrid", "--mode", help="hybrid only"), seed: int = SEED_OPTION,
               params: Path = PARAMS_OPTION) -> None:
    """Control (hybrid): one seeded random genome, never searched, with exactly the Adam phases of
    `evolve` of the same seed. Outputs as `evolve`'s, under fixed_body/."""
    search_variant("fixed_body", mode, seed, params)


if __name__ == "__main__":
    app(prog_name="python -m stages.evolve")  # COMMAND: evolve, random, no_surrogate or fixed_body
