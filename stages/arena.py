"""Stages `es` and `mezo`: the arena's gradient-free trainers of a dense GPT-2 (clso.search.zeroth_order),
one contestant per mode and seed of params.yaml's grid, each resumable at any curve point. The model
starts from the baseline's initialisation (base.seed); the grid's seed draws the noise and the batches.
Each spends a share of the baseline's whole-run FLOPs (its section's budget_share), never less than CLSO's
charged FLOPs of the same mode and seed, or stops at its step cap; in hybrid mode it gets the Adam phases of `evolve` of the same seed, at the same shares."""

import math
from dataclasses import asdict
from pathlib import Path

from clso import ClsoError
from clso.compare import AT_CLSO_FLOPS
from clso.context import setup
from clso.data.tokens import TokenData, final_losses
from clso.energy import EnergyMeter
from clso.field.checkpoint import FieldCheckpoint
from clso.io import atomic_dir, read_json, write_csv_atomic
from clso.model.baseline import dense_gpt2, save_baseline
from clso.model.crystalline import ModelConfig
from clso.params import MODES, load_params
from clso.progress import progress_bar
from clso.record import Record, curve_points, split_cost
from clso.search.zeroth_order import AdamPhases, Settings, train
from stages.common import MODE_OPTION, PARAMS_OPTION, SEED_OPTION, app, fingerprint, shared_costs, stage
from stages.paths import PREPARED, Contestant, detail

CURVE_FIELDS = ("step", "val_loss", "energy_wh", "energy_method", "flops", "wall_s")


def settings(p, method: str) -> Settings:
    s = getattr(p, method)
    return Settings(method, pairs=s.pairs, sigma=s.sigma, lr=s.lr, rank=getattr(s, "rank", 1), batch_size=s.batch_size,
                    max_steps=s.max_steps, eval_interval=s.eval_interval, eval_batches=s.eval_batches)


def phases(p, me: Contestant) -> AdamPhases | None:
    """Hybrid mode's Adam phases: those of CLSO's run of the same seed, at the shares of its search FLOPs
    (Adam's aside) at which it ran them; they count in this run's FLOP budget."""
    if me.mode != "hybrid":
        return None
    clso = Record.load(me.clso().record)
    search = clso.costs["search"]["flops"] - clso.details["adam_flops"]
    return AdamPhases(at=tuple(f / search for f in clso.details["adam_at_search_flops"]), steps=p.evolve.hybrid_steps,
                      lr=p.evolve.hybrid_lr, batch_size=p.evolve.hybrid_batch_size)


def clso_flops(me: Contestant) -> int:
    """Everything CLSO's search of the same mode and seed is charged, in FLOPs (shared costs included):
    where the contrast with CLSO's GA reads this run."""
    details = {stage: read_json(detail(stage)) for stage in ("library", "surrogate")}
    return Record.load(me.clso().record).flops_with(shared_costs(details))


def run_dense(method: str, mode: str, seed: int | None, params: Path) -> None:
    """Train one contestant from where its checkpoint left it; write its model, record and curve."""
    p = load_params(params)
    me = Contestant(method, mode, p.base.seed if seed is None else seed)
    device = setup(p.base)
    data = TokenData.open(PREPARED)
    config = ModelConfig.from_params(p.model, data.vocab_size, layer_gains=False)
    s, adam = settings(p, method), phases(p, me)
    at_clso = clso_flops(me)
    share = getattr(p, method).budget_share * Record.load(Contestant("baseline").record).details["whole_run"]["flops"]
    budget = max(int(share), at_clso)  # never short of where the contrast with CLSO's GA reads it
    model = dense_gpt2(config, p.base.seed, device)  # the baseline's initialisation
    meter = p.base.meter_options(device)
    checkpoint = FieldCheckpoint(me.checkpoints, fingerprint(
        {"base": asdict(p.base), "model": asdict(p.model), "settings": asdict(s), "mode": mode, "seed": me.seed,
         "budget": budget, "phases": asdict(adam) if adam else None, "device": str(device)},
        [data.meta_file], "stages.arena"))
    with progress_bar() as bar:
        task = bar.add_task(me.name, total=None, info="")

        def show(row):
            bar.update(task, info=f"step {row['step']}  val {row['val_loss']:.4f}  {row['flops']:.3g} of "
                                  f"{budget:.3g} FLOPs  {row['energy_wh']:.4f} Wh")

        result = train(model, s, data, mode=mode, seed=me.seed, budget_flops=budget, device=device,
                       meter_options=meter, phases=adam, on_eval=show, checkpoint=checkpoint,
                       score_at=at_clso if method in AT_CLSO_FLOPS else None)  # where compare reads it
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to no one
        val, test = final_losses(lambda x: model(input_ids=x).logits, data, config.block_size, device)
    with atomic_dir(me.model_dir) as tmp:
        save_baseline(model, tmp)
    cost, rest = split_cost(result.train_energy)
    Record(me.name, me.kind, me.label, val, test, {"training": cost},
           {"loss": f"val ({s.eval_batches} batches)", "points": curve_points(result.curve, "val_loss", "step")},
           (), me.mode, me.seed,
           details={"method": method, "settings": asdict(s), "budget_flops": budget, "steps": result.steps,
                    "stopped": result.stopped, "adam_phases": result.adam_phases, "adam_flops": result.adam_flops,
                    "at_clso_flops": result.scored_at,
                    "device": str(device), **rest},
           uncharged={"final_scores": final_meter.reading.as_metrics(),
                      "curve_val_loss": {"energy_wh": result.eval_energy_wh, "method": cost["method"]}}
           ).save(me.record)
    write_csv_atomic(me.curve, CURVE_FIELDS, result.curve)
    checkpoint.clear()
    print(f"{me.name}: {result.stopped} after {result.steps} steps ({result.adam_phases} Adam phases); val loss "
          f"{val:.4f} (ppl {math.exp(val):.1f}); {cost['energy_wh']:.4f} Wh ({cost['method']}), {result.flops:.3g} FLOPs")


SECTIONS = ("base", "model", "evolve")


@stage("es", sections=(*SECTIONS, "es"))
def es(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """The arena's low-rank evolution strategies (EGGROLL) on a dense GPT-2: antithetic pairs of
    (σ/√r)·A·Bᵀ perturbations, the z-scored losses' estimate into Adam. Checkpoints at every curve point
    in checkpoints/search/es/MODE-SEED; writes models/search/es/MODE-SEED/, its record
    metrics/detail/contestants/es@MODE-SEED.json and plots/search/es/MODE-SEED.csv."""
    _check(mode)
    run_dense("es", mode, seed, params)


@stage("mezo", sections=(*SECTIONS, "mezo"))
def mezo(mode: str = MODE_OPTION, seed: int = SEED_OPTION, params: Path = PARAMS_OPTION) -> None:
    """The arena's zeroth-order SGD (MeZO's SPSA) on a dense GPT-2: per step, the loss at θ ± εz along
    random directions z, SGD on the projected gradient. Outputs as `es`'s, under mezo/."""
    _check(mode)
    run_dense("mezo", mode, seed, params)


def _check(mode: str) -> None:
    if mode not in MODES:
        raise ClsoError(f"--mode {mode}: not valid; valid: {', '.join(MODES)}")


if __name__ == "__main__":
    app(prog_name="python -m stages.arena")  # COMMAND: es or mezo
