"""Stage `sweep`, frozen in dvc.yaml (measured once, not by `dvc repro`): the step sizes of the arena's
dense trainers, chosen on the train split. Each pair of a grid (σ and lr for es; ε and lr for mezo) trains
in pure mode on a share of the baseline's whole-run FLOPs; its loss on fixed train batches at the end
decides (val never chooses). params.yaml's es and mezo sections take the best by hand; a test keeps them
equal. Re-measure: `python -m stages.sweep && dvc commit -f sweep`. Its cost is reported, not charged:
the baseline's learning rate was not swept either."""

import math
from dataclasses import replace
from itertools import product
from pathlib import Path

from clso.context import derive_seed, setup
from clso.data.tokens import TokenData
from clso.energy import EnergyMeter
from clso.io import write_json_atomic
from clso.machine import machine
from clso.model.baseline import dense_gpt2
from clso.model.crystalline import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from clso.record import Record
from clso.search.zeroth_order import train
from stages.arena import settings
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import PREPARED, Contestant, detail

# the grids: (σ or ε, lr) of each method, around the published settings and the scale a from-scratch run
# needs, widened where a best sat on an edge (ES's lr chose 0.01 of 0.001-0.01, then 0.003-0.03; σ and ε
# chose 0.01, the top of 0.0005-0.01 and 0.0001-0.01, so they reach 0.05 and 0.1 now; MeZO's lr 0.03 diverged)
GRIDS = {"es": {"sigma": (0.001, 0.005, 0.01, 0.02, 0.05), "lr": (0.003, 0.01, 0.03)},
         "mezo": {"sigma": (0.001, 0.01, 0.03, 0.1), "lr": (0.001, 0.003, 0.01, 0.03)}}
TRIAL_SHARE = 0.1  # of the baseline's whole-run FLOPs, per trial


@stage("sweep", sections=("base", "model", "es", "mezo"))
def sweep(params: Path = PARAMS_OPTION) -> None:
    """Train each (σ, lr) of es's grid and each (ε, lr) of mezo's in pure mode on TRIAL_SHARE of the
    baseline's whole-run FLOPs, from the baseline's initialisation at base.seed, its noise and batches drawn
    on a seed of its own (no contestant's); write each trial's loss
    on fixed train batches, the best of each method and the sweep's cost to metrics/detail/sweep.json."""
    p = load_params(params)
    device = setup(p.base)
    data = TokenData.open(PREPARED)
    config = ModelConfig.from_params(p.model, data.vocab_size, layer_gains=False)
    budget = int(TRIAL_SHARE * Record.load(Contestant("baseline").record).details["whole_run"]["flops"])
    meter = p.base.meter_options(device)
    out = {}
    trials = [(m, sigma, lr) for m, g in GRIDS.items() for sigma, lr in product(g["sigma"], g["lr"])]
    with EnergyMeter(**meter) as cost, progress_bar() as bar:
        task = bar.add_task("sweep", total=len(trials), info="")
        for method, sigma, lr in trials:
            bar.update(task, info=f"{method} σ {sigma} lr {lr}")
            s = replace(settings(p, method), sigma=sigma, lr=lr, max_steps=10**9)
            result = train(dense_gpt2(config, p.base.seed, device), s, data, mode="pure", seed=derive_seed(p.base.seed, "sweep"),
                           budget_flops=budget, device=device, meter_options=meter, curve_split="train")
            loss = result.curve[-1]["val_loss"]  # the curve's loss, on train batches here
            out.setdefault(method, []).append({"sigma": sigma, "lr": lr, "steps": result.steps,
                                               "train_loss": loss if math.isfinite(loss) else None})  # None: diverged
            bar.advance(task)
    best = {m: min((r for r in rows if r["train_loss"] is not None), key=lambda r: r["train_loss"])
            for m, rows in out.items()}
    write_json_atomic(detail("sweep"), {"budget_flops": budget, "trial_share": TRIAL_SHARE, "trials": out,
                                        "best": best, "machine": machine(), "cost": cost.reading.as_metrics()})
    for m, b in best.items():
        print(f"sweep: {m}: best σ {b['sigma']}, lr {b['lr']} (train loss {b['train_loss']:.4f})")


if __name__ == "__main__":
    run_alone("sweep")
