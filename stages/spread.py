"""Stage `spread`, frozen in dvc.yaml (measured once, not by `dvc repro`): the contestants the
default run trains once — the baseline, the field LM and its control — trained again at every seed
of grid.seeds, so the report has their noise floor. About 18 minutes on 2 cores.
Re-measure after a change to them: `python -m stages.spread && dvc commit -f spread` (clso.compare.REMEASURE)."""

from pathlib import Path

from clso.compare import ONE_RUN
from clso.context import setup
from clso.data.tokens import FINAL_BATCH, TokenData, split_loss
from clso.energy import EnergyMeter
from clso.field.train import train_field
from clso.io import write_json_atomic
from clso.machine import machine
from clso.model.baseline import train_baseline
from clso.model.crystalline import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.field import settings
from stages.paths import PREPARED, detail


@stage("spread", sections=("base", "model", "baseline", "field", "grid"))
def spread(params: Path = PARAMS_OPTION) -> None:
    """Train the baseline, the field LM and the field LM without neurons at every seed of grid.seeds
    (the seed of their initialisation and batches; the data split stays base.seed's) and write their
    val losses on the whole val split to metrics/detail/spread.json, with the machine. The run at
    base.seed repeats the default run's, so `compare` can tell whether the spread was measured on this
    code and machine."""
    p = load_params(params)
    device = setup(p.base)
    data = TokenData.open(PREPARED)
    meter = p.base.meter_options(device)
    val_loss: dict[str, dict[str, float]] = {name: {} for name in ONE_RUN}
    with EnergyMeter(**meter) as cost, progress_bar() as bar:
        task = bar.add_task("spread", total=len(ONE_RUN) * len(p.grid.seeds), info="")
        for seed in p.grid.seeds:
            for name in ONE_RUN:
                bar.update(task, info=f"{name}, seed {seed}")
                val_loss[name][str(seed)] = train_once(name, p, data, seed, device, meter)
                bar.advance(task)
    write_json_atomic(detail("spread"), {"seeds": p.grid.seeds, "base_seed": p.base.seed, "val_loss": val_loss,
                                         "machine": machine(), "cost": cost.reading.as_metrics()})
    for name, losses in val_loss.items():
        print(f"spread: {name}: val loss " + ", ".join(f"{v:.4f} (seed {s})" for s, v in losses.items()))


def train_once(name: str, p, data: TokenData, seed: int, device, meter: dict) -> float:
    """Contestant `name` trained as its stage trains it, at `seed`; its loss on the whole val split."""
    if name == "baseline":
        config = ModelConfig.from_params(p.model, data.vocab_size, layer_gains=False)
        model = train_baseline(data, config, p.baseline, seed=seed, device=device, meter_options=meter).model

        def logits(x):
            return model(input_ids=x).logits
    else:
        logits = train_field(data, settings(name, p.field), block_size=p.model.block_size, seed=seed, device=device,
                             meter_options=meter).model
    return split_loss(logits, data.tokens("val"), p.model.block_size, FINAL_BATCH, device)


if __name__ == "__main__":
    run_alone("spread")
