"""Stage `baseline`: the dense GPT-2 of `model`, trained with AdamW on the same data and tokenizer as
CLSO, with its loss-against-energy curve."""

import math
from dataclasses import asdict
from pathlib import Path

from clso import ClsoError
from clso.context import setup
from clso.data.tokens import TokenData, final_losses
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_csv_atomic
from clso.model.baseline import CURVE_FIELDS, save_baseline, train_baseline
from clso.model.crystalline import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from clso.record import Record, curve_points, split_cost
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import PREPARED, Contestant


@stage("baseline", sections=("base", "model", "baseline"))
def baseline(params: Path = PARAMS_OPTION) -> None:
    """Train the dense GPT-2 of `model` with AdamW on the train split; keep the weights of its lowest
    val loss on the curve (early stopping) and charge it what training had cost by then; write
    models/baseline/, its record metrics/detail/contestants/baseline.json (val and test loss, cost,
    curve) and plots/baseline.csv (loss against tokens, energy, FLOPs, wall: the whole run)."""
    p = load_params(params)
    device = setup(p.base)
    data = TokenData.open(PREPARED)
    me = Contestant("baseline")
    config = ModelConfig.from_params(p.model, data.vocab_size, layer_gains=False)
    meter = p.base.meter_options(device)
    with progress_bar() as bar:
        task = bar.add_task("baseline", total=p.baseline.steps, info="")

        def show(row):
            bar.update(task, completed=row["step"], info=f"val {row['val_loss']:.4f}  {row['energy_wh']:.4f} Wh")

        result = train_baseline(data, config, p.baseline, seed=p.base.seed, device=device, meter_options=meter,
                                on_eval=show)
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to no one
        val, test = final_losses(lambda x: result.model(input_ids=x).logits, data, config.block_size, device)
    with atomic_dir(me.model_dir) as tmp:
        save_baseline(result.model, tmp)
    cost, rest = split_cost(result.train_energy)
    charged, points, after = to_best_point(result, p.baseline.steps)
    Record(me.name, me.kind, me.label, val, test, {"training": charged}, {"loss": "val", "points": points},
           details={"steps": p.baseline.steps, "tokens": result.curve[-1]["tokens"], "best_curve_step": result.best_step,
                    "best_curve_val_loss": min(r["val_loss"] for r in result.curve), "whole_run": cost, **rest,
                    "setup": asdict(result.setup), "device": str(device)},
           uncharged={"final_scores": final_meter.reading.as_metrics(),
                      "curve_val_loss": {"energy_wh": rest["eval_energy_wh"], "method": cost["method"]}, **after}
           ).save(me.record)
    write_csv_atomic(me.curve, CURVE_FIELDS, result.curve)
    e, s = result.train_energy, result.setup
    print(f"baseline: {p.baseline.steps} steps ({s.precision}, {s.attention} attention, {s.adamw} AdamW, compile "
          f"{s.torch_compile}), best val at step {result.best_step}: val loss {val:.4f} (ppl {math.exp(val):.1f}) "
          f"on the whole val split; the whole run "
          f"{e['energy_wh']:.4f} Wh ({e['method']}), {e['tokens_per_s']:,.0f} tokens/s, "
          f"{e['achieved_tflops']:.3g} TFLOP/s" + (f", MFU {e['mfu']:.1%}" if e["mfu"] is not None else ""))


def to_best_point(result, steps: int) -> tuple[dict, list[dict], dict]:
    """The baseline as early stopping keeps it: the cost charged (training up to its best val point), its
    curve up to there, and what training cost after it (charged to no one). A baseline whose val loss
    never fell below its value at initialisation is no baseline: a one-line error."""
    if result.best_step == 0:
        raise ClsoError("baseline: its val loss never fell below its value at initialisation; lower baseline.lr "
                        "or raise baseline.steps")
    whole = split_cost(result.train_energy)[0]
    if result.best_step == steps:
        return whole, curve_points(result.curve, "val_loss", "step"), {}
    return (split_cost(result.to_best)[0],
            curve_points([r for r in result.curve if r["step"] <= result.best_step], "val_loss", "step"),
            {"training_after_best": split_cost(result.after_best)[0]})


if __name__ == "__main__":
    run_alone("baseline")
