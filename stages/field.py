"""Stage `field`: the crystal journal's neuron-field LM (document 004), trained by gradient with
growth and freezing, with its loss-against-energy curve and a picture of its neurons."""

import math
from dataclasses import asdict, replace
from pathlib import Path

from clso.context import resolve_precision, setup
from clso.data.tokens import TokenData, final_losses
from clso.energy import EnergyMeter
from clso.field.checkpoint import FieldCheckpoint
from clso.field.train import CURVE_FIELDS, final_train_loss, train_field
from clso.io import atomic_dir, write_csv_atomic
from clso.params import load_params
from clso.plots import neurons_png
from clso.progress import progress_bar
from clso.record import Record, curve_points, split_cost
from stages.common import PARAMS_OPTION, app, fingerprint, stage
from stages.paths import FIELD_NEURONS, PREPARED, Contestant


SECTIONS = ("base", "model", "field")


@stage("field", sections=SECTIONS)
def field(params: Path = PARAMS_OPTION) -> None:
    """Train the neuron-field LM of params.yaml's `field` section on the train split (context
    model.block_size, the baseline's); write models/field/, its record metrics/detail/contestants/field.json,
    plots/field.csv (a row per step: loss, neurons, frozen share, energy with its method, FLOPs) and
    plots/field_neurons.png (the neurons' positions in two dimensions, by PCA, coloured by birth step).
    Saves the run to checkpoints/field every eval_interval steps: a killed run resumes."""
    p = load_params(params)
    model, val = train(p, Contestant("field"), settings("field", p.field))
    neurons = sum(f.alive for f in model.fields)
    neurons_png(model.fields, FIELD_NEURONS, f"neuron field after {p.field.steps} steps: {neurons} neurons "
                f"(PCA of positions; val loss {val:.3f})")


@stage("field_no_neurons", sections=SECTIONS)
def field_no_neurons(params: Path = PARAMS_OPTION) -> None:
    """The field LM's control: the same model and training with every field empty (no neurons, no
    growth), so attention and MLP alone; what the neurons add is the difference. Outputs as `field`'s,
    under field_no_neurons (no picture)."""
    p = load_params(params)
    train(p, Contestant("field_no_neurons"), settings("field_no_neurons", p.field))


def settings(name: str, s):
    """The `field` section as contestant `name` (field or field_no_neurons) trains it."""
    return replace(s, initial_neurons=0, grow_every=0) if name == "field_no_neurons" else s


def train(p, me: Contestant, s) -> tuple:
    """Train one field LM of settings `s` (resuming from its checkpoint); write its model, record and
    curve; return the model and its val loss."""
    device = setup(p.base)
    data = TokenData.open(PREPARED)
    meter = p.base.meter_options(device)
    checkpoint = FieldCheckpoint(me.checkpoints, fingerprint(
        {"base": asdict(p.base), "model": asdict(p.model), "field": asdict(s),
         "precision": resolve_precision(s.precision, device), "device": str(device)},
        [data.meta_file], "stages.field"))
    with progress_bar() as bar:
        task = bar.add_task(me.name, total=s.steps, info="")

        def show(row):
            if row["val_loss"] is not None:
                bar.update(task, completed=row["step"], info=f"val {row['val_loss']:.4f}  {row['neurons']} neurons  "
                           f"{row['energy_wh']:.4f} Wh")

        result = train_field(data, s, block_size=p.model.block_size, seed=p.base.seed, device=device,
                             meter_options=meter, on_step=show, checkpoint=checkpoint)
    model = result.model
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to no one
        val, test = final_losses(model, data, p.model.block_size, device)
    with atomic_dir(me.model_dir) as tmp:
        model.save(tmp)
    last, neurons = result.curve[-1], [f.alive for f in model.fields]
    best = min((r for r in result.curve if r["val_loss"] is not None), key=lambda r: r["val_loss"])
    cost, rest = split_cost(result.train_energy)
    Record(me.name, me.kind, me.label, val, test, {"training": cost},
           {"loss": "val", "points": curve_points(result.curve, "val_loss", "step")},
           details={"steps": s.steps, "tokens": last["tokens"], "final_train_loss": final_train_loss(result.curve),
                    # our tokenizer's, per split: puts the losses in nats per character, as the journal's can be
                    "tokens_per_char": {split: data.meta["tokens"][split] / data.meta["chars"][split]
                                        for split in ("train", "val")},
                    "best_curve_val_loss": best["val_loss"], "best_curve_step": best["step"],
                    "neurons": sum(neurons), "neurons_per_field": neurons, "frozen_share": last["frozen_share"],
                    "mean_lr_multiplier": last["mean_lr_multiplier"], "freeze": s.freeze, "attention": s.attention,
                    "parameters": model.parameter_count(), **rest, "precision": result.precision,
                    "torch_compile": "none", "device": str(device), "resumed_at_step": result.resumed_at},
           uncharged={"final_scores": final_meter.reading.as_metrics(),
                      "curve_val_loss": {"energy_wh": rest["eval_energy_wh"], "method": cost["method"]},
                      "checkpoints": {"energy_wh": rest["checkpoint_energy_wh"], "method": cost["method"]}}
           ).save(me.record)
    write_csv_atomic(me.curve, CURVE_FIELDS, result.curve)
    checkpoint.clear()
    e = result.train_energy
    resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
    print(f"{me.name}: {s.steps} steps ({result.precision}{resumed}), {sum(neurons)} neurons, {last['frozen_share']:.0%} "
          f"frozen ({s.freeze}), val loss {val:.4f} (ppl {math.exp(val):.1f}) on the whole val split, "
          f"{e['energy_wh']:.4f} Wh ({e['method']}), {e['flops']:.3g} FLOPs, {e['tokens_per_s']:,.0f} tokens/s")
    return model, val


if __name__ == "__main__":
    app(prog_name="python -m stages.field")  # COMMAND: field or field_no_neurons
