"""Stage `evolve`: the CLSO genetic search with its surrogate, resumable after any generation."""

import hashlib
import inspect
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

import clso.data
import clso.energy
import clso.evaluate
import clso.evolve
import clso.flops
import clso.ga
import clso.library
import clso.model
import clso.search
import clso.surrogate
from clso import ClsoError
from clso.bound import frozen_head_bound
from clso.context import setup
from clso.evaluate import split_loss, split_targets
from clso.energy import EnergyMeter
from clso.evolve import HISTORY_FIELDS, Evolution
from clso.io import atomic_dir, write_csv_atomic, write_json_atomic
from clso.params import load_params
from clso.plots import evolution_png
from clso.progress import progress_bar
from clso.search import build_search
from clso.surrogate import Surrogate, SurrogateConfig
from stages.common import PARAMS_OPTION, run_alone, stage

SURROGATE_DIR = Path("models/surrogate")
CHECKPOINT_DIR = Path("checkpoints/evolve")
OUT_DIR = Path("models/clso")
METRICS = Path("metrics/evolve.json")
PLOT = Path("plots/evolve.csv")
FIGURE = Path("plots/evolve.png")
VAL_BATCH = 16
# the code the search's results and accounting come from: a checkpoint another version wrote is not resumed
SEARCH_CODE = (clso.data, clso.energy, clso.evaluate, clso.evolve, clso.flops, clso.ga, clso.library, clso.model,
               clso.search, clso.surrogate)


def _load_surrogate() -> tuple[Surrogate, np.ndarray, np.ndarray]:
    try:
        config = json.loads((SURROGATE_DIR / "surrogate.json").read_text())
        data = json.loads((SURROGATE_DIR / "data.json").read_text())
        model = Surrogate(SurrogateConfig(**{**config, "gene_buckets": tuple(config["gene_buckets"])}))
        model.load_state_dict(load_file(str(SURROGATE_DIR / "surrogate.safetensors")))
    except FileNotFoundError as e:
        raise ClsoError(f"{e.filename}: not found; run `dvc repro surrogate` first") from None
    except Exception as e:
        raise ClsoError(f"{SURROGATE_DIR}: unreadable surrogate ({type(e).__name__}); "
                        "re-create it with `dvc repro -f surrogate`") from None
    return model, np.array(data["genomes"], dtype=np.int64), np.array([float(x) for x in data["losses"]])


def _fingerprint(p, files) -> str:
    """What a checkpoint must match to be resumed: params, inputs, and the project's code — a fix to
    the search or its accounting must not be mixed into a run the old code began."""
    h = hashlib.sha256(json.dumps({k: asdict(getattr(p, k)) for k in ("base", "model", "fitness", "evolve")},
                                  sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    for module in SEARCH_CODE:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()


@stage("evolve", sections=("base", "model", "fitness", "evolve"))
def evolve(params: Path = PARAMS_OPTION) -> None:
    """Run the genetic search from the pretrained surrogate; checkpoints after every generation in
    checkpoints/evolve (a killed run resumes), and writes models/clso/, metrics/evolve.json and
    plots/evolve.csv."""
    p = load_params(params)
    device = setup(p.base)
    search = build_search("data/prepared", "models/library", p.model, fitness_batch_size=p.fitness.batch_size,
                          seed=p.base.seed, device=device)
    surrogate, genomes, losses = _load_surrogate()
    if surrogate.config.gene_buckets != search.gene_buckets or surrogate.config.library_size != search.library.size:
        raise ClsoError("models/surrogate was trained for another genome layout; run `dvc repro surrogate`")
    fingerprint = _fingerprint(p, ["data/prepared/meta.json", "models/library/manifest.json",
                                   SURROGATE_DIR / "surrogate.safetensors"])
    meter = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    evolution = Evolution(search, p.evolve, surrogate, (genomes, losses), p.base.seed, CHECKPOINT_DIR,
                          fingerprint, meter)
    resumed_at = len(evolution.run.history)
    with progress_bar() as bar:
        task = bar.add_task("evolve", total=p.evolve.generations + 1, completed=resumed_at,
                            info="resumed" if resumed_at else "")

        def show(run):
            row = run.history[-1]
            bar.update(task, completed=len(run.history),
                       info=f"best {row['best_loss']:.4f}  true {row['true_evaluations']}  "
                            f"predicted {row['surrogate_predictions']}  {row['energy_wh']:.4f} Wh")

        run = evolution.run_to_end(on_generation=show)

    model = search.model
    model.set_genome(run.ga_state.best_genome)
    val_tokens = search.data.tokens("val")
    with EnergyMeter(**meter) as final_meter:  # measuring, not training: charged to neither side
        val = split_loss(model, val_tokens, p.model.block_size, VAL_BATCH, device)
        bound = None
        if p.evolve.mode == "pure":  # nothing continuous trained: the frozen head limits every body
            gpt = model.gpt2
            bound = frozen_head_bound(gpt.lm_head.weight, gpt.transformer.ln_f.weight, gpt.transformer.ln_f.bias,
                                      split_targets(val_tokens, p.model.block_size))
    last, cost = run.history[-1], evolution.cost
    with atomic_dir(OUT_DIR) as tmp:
        write_json_atomic(tmp / "best_genome.json", {
            "genome": run.ga_state.best_genome.tolist(), "fitness_loss": run.ga_state.best_fitness,
            "library_seed": search.library.seed, "mode": p.evolve.mode, "model": asdict(search.config)})
        save_file(model.continuous_state(), str(tmp / "continuous.safetensors"), metadata={"clso": "continuous/1"})
    total = run.true_evaluations + run.surrogate_predictions
    write_json_atomic(METRICS, {
        "mode": p.evolve.mode, "generations": run.ga_state.generation, "stopped": run.stopped,
        "best_fitness_loss": run.ga_state.best_fitness, "val_loss": val, "val_ppl": math.exp(val),
        "true_evaluations": run.true_evaluations, "surrogate_predictions": run.surrogate_predictions,
        "evaluations_saved_share": round(run.surrogate_predictions / total, 4) if total else 0.0,
        "energy_wh": last["energy_wh"], "method": last["energy_method"], "flops": last["flops"],
        "wall_s": last["wall_s"],
        # writing checkpoints is metered apart and charged to neither side (the baseline writes none)
        "checkpoint": {"energy_wh": cost.checkpoint_energy_j / 3600, "method": last["energy_method"],
                       "wall_s": cost.checkpoint_wall_s},
        "final_evaluation": final_meter.reading.as_metrics(),
        **({"frozen_head_bound": {"val_loss": bound["loss"], "val_ppl": bound["ppl"], "solver_gap": bound["solver_gap"],
                                  "distinct_targets": bound["distinct_targets"]}} if bound else {}),
    })
    write_csv_atomic(PLOT, HISTORY_FIELDS, run.history)
    evolution_png(run.history, FIGURE, f"CLSO {p.evolve.mode}: P={p.evolve.population}, "
                                       f"M={search.library.size}, {search.genome_length} genes",
                  uniform_loss=math.log(search.config.vocab_size))
    print(f"evolve: {run.stopped} after generation {run.ga_state.generation}; best fitness "
          f"{run.ga_state.best_fitness:.4f}, val loss {val:.4f} (ppl {math.exp(val):.1f}); "
          f"{run.true_evaluations} true evaluations, {run.surrogate_predictions} predictions")
    if bound:
        print(f"evolve: no body can bring the frozen head's val loss below {bound['loss']:.4f} (ppl {bound['ppl']:.1f})")


if __name__ == "__main__":
    run_alone("evolve")
