"""Stage `baseline`: the dense GPT-2 trained with AdamW, with its loss-against-energy curve."""

import math
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from clso.context import setup
from clso.data.tokens import TokenData, split_loss
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_csv_atomic, write_json_atomic
from clso.model.baseline import CURVE_FIELDS, state_for_saving, train_baseline
from clso.model.crystalline import ModelConfig
from clso.params import load_params
from clso.progress import progress_bar
from stages.common import PARAMS_OPTION, run_alone, stage

OUT_DIR = Path("models/baseline")
METRICS = Path("metrics/baseline.json")
PLOT = Path("plots/baseline.csv")
VAL_BATCH = 16


@stage("baseline", sections=("base", "model", "baseline"))
def baseline(params: Path = PARAMS_OPTION) -> None:
    """Train the dense GPT-2 of `model` with AdamW on the train split; write models/baseline/,
    metrics/baseline.json and plots/baseline.csv (loss against tokens, energy, FLOPs, wall)."""
    p = load_params(params)
    device = setup(p.base)
    data = TokenData.open("data/prepared")
    m = p.model
    config = ModelConfig.from_params(m, data.vocab_size, layer_gains=False)
    meter = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    with progress_bar() as bar:
        task = bar.add_task("baseline", total=p.baseline.steps, info="")

        def show(row):
            bar.update(task, completed=row["step"],
                       info=f"val {row['val_loss']:.4f}  {row['energy_wh']:.4f} Wh")

        result = train_baseline(data, config, p.baseline, seed=p.base.seed, device=device,
                                meter_options=meter, on_eval=show)
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to neither side
        val = split_loss(lambda x: result.model(input_ids=x).logits, data.tokens("val"), m.block_size, VAL_BATCH, device)
    with atomic_dir(OUT_DIR) as tmp:
        save_file(state_for_saving(result.model), str(tmp / "model.safetensors"), metadata={"clso": "baseline/1"})
    best = min(result.curve, key=lambda r: r["val_loss"])
    write_json_atomic(METRICS, {
        "steps": p.baseline.steps, "tokens": result.curve[-1]["tokens"],
        "final_val_loss": val, "final_val_ppl": math.exp(val),
        "best_curve_val_loss": best["val_loss"], "best_curve_val_ppl": math.exp(best["val_loss"]),
        "best_curve_step": best["step"],
        **result.train_energy, "setup": asdict(result.setup), "device": str(device),
        "final_evaluation": final_meter.reading.as_metrics(),
    })
    write_csv_atomic(PLOT, CURVE_FIELDS, result.curve)
    e, s = result.train_energy, result.setup
    print(f"baseline: {p.baseline.steps} steps ({s.precision}, {s.attention} attention, {s.adamw} AdamW, compile "
          f"{s.torch_compile}), val loss {val:.4f} (ppl {math.exp(val):.1f}) on the whole val split, "
          f"{e['energy_wh']:.4f} Wh ({e['method']}), {e['tokens_per_s']:,.0f} tokens/s, "
          f"{e['achieved_tflops']:.3g} TFLOP/s" + (f", MFU {e['mfu']:.1%}" if e["mfu"] is not None else ""))


if __name__ == "__main__":
    run_alone("baseline")
