"""Stage `field`: the crystal journal's neuron-field LM (document 004), trained by gradient with
growth and freezing, with its loss-against-energy curve and a picture of its neurons."""

import math
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from clso.context import resolve_precision, setup
from clso.data.tokens import TokenData, split_loss
from clso.energy import EnergyMeter
from clso.field.checkpoint import FieldCheckpoint
from clso.field.train import CURVE_FIELDS, EVAL_BATCH, field_config, train_field
from clso.io import atomic_dir, write_csv_atomic, write_json_atomic
from clso.params import load_params
from clso.plots import neurons_png
from clso.progress import progress_bar
from stages.common import PARAMS_OPTION, fingerprint, run_alone, stage

OUT_DIR = Path("models/field")
METRICS = Path("metrics/field.json")
PLOT = Path("plots/field.csv")
NEURONS_PNG = Path("plots/field_neurons.png")
CHECKPOINT = Path("checkpoints/field")


@stage("field", sections=("base", "model", "field"))
def field(params: Path = PARAMS_OPTION) -> None:
    """Train the neuron-field LM of params.yaml's `field` section on the train split (context
    model.block_size, the baseline's); write models/field/, metrics/field.json, plots/field.csv (a row
    per step: loss, neurons, frozen share, energy with its method, FLOPs) and plots/field_neurons.png
    (the neurons' positions in two dimensions, by PCA, coloured by birth step). Saves the run to
    checkpoints/field every eval_interval steps: a killed run resumes."""
    p = load_params(params)
    device = setup(p.base)
    data = TokenData.open("data/prepared")
    cfg = p.field
    config = field_config(cfg, data.vocab_size, p.model.block_size)
    meter = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    with progress_bar() as bar:
        task = bar.add_task("field", total=cfg.steps, info="")

        def show(row):
            if row["val_loss"] is not None:
                bar.update(task, completed=row["step"], info=f"val {row['val_loss']:.4f}  {row['neurons']} neurons  "
                           f"{row['energy_wh']:.4f} Wh")

        checkpoint = FieldCheckpoint(CHECKPOINT, fingerprint(
            {"base": asdict(p.base), "model": asdict(p.model), "field": asdict(cfg),
             "precision": resolve_precision(cfg.precision, device), "device": str(device)},
            [data.folder / "meta.json"], "stages.field"))
        result = train_field(data, config, cfg, seed=p.base.seed, device=device, meter_options=meter, on_step=show,
                             checkpoint=checkpoint)
    model = result.model
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to no one
        val = split_loss(model, data.tokens("val"), p.model.block_size, EVAL_BATCH, device)
    with atomic_dir(OUT_DIR) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
                  metadata={"clso": "field/1"})
        write_json_atomic(tmp / "config.json", asdict(config))
    last = result.curve[-1]
    evaluated = [r for r in result.curve if r["val_loss"] is not None]
    best = min(evaluated, key=lambda r: r["val_loss"])
    neurons = [f.alive for f in model.fields]
    write_json_atomic(METRICS, {
        "steps": cfg.steps, "tokens": last["tokens"], "final_val_loss": val, "final_val_ppl": math.exp(val),
        "best_curve_val_loss": best["val_loss"], "best_curve_val_ppl": math.exp(best["val_loss"]),
        "best_curve_step": best["step"], "neurons": sum(neurons), "neurons_per_field": neurons,
        "frozen_share": last["frozen_share"], "mean_lr_multiplier": last["mean_lr_multiplier"],
        "freeze": cfg.freeze, "attention": cfg.attention, "parameters": sum(t.numel() for n, t in model.named_parameters() if ".field." not in n)
        + sum((2 * config.n_embd + 1) * n for n in neurons),  # a born neuron: position, value, temperature
        **result.train_energy, "precision": result.precision, "torch_compile": "none", "device": str(device),
        "final_evaluation": final_meter.reading.as_metrics(),
        "resumed_at_step": result.resumed_at,
    })
    write_csv_atomic(PLOT, CURVE_FIELDS, result.curve)
    neurons_png(model.fields, NEURONS_PNG, f"neuron field after {cfg.steps} steps: {sum(neurons)} neurons "
                f"(PCA of positions; val loss {val:.3f})")
    checkpoint.clear()
    e = result.train_energy
    resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
    print(f"field: {cfg.steps} steps ({result.precision}{resumed}), {sum(neurons)} neurons, {last['frozen_share']:.0%} frozen "
          f"({cfg.freeze}), val loss {val:.4f} (ppl {math.exp(val):.1f}) on the whole val split, "
          f"{e['energy_wh']:.4f} Wh ({e['method']}), {e['flops']:.3g} FLOPs, {e['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    run_alone("field")
