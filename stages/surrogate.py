"""Stage `surrogate`: truly evaluate genomes, pretrain the ranking surrogate, and report how well
it ranks genomes it has not seen."""

import dataclasses
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from clso.context import derive_seed, resolve_precision, setup
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_json_atomic
from clso.model.library import structure_features
from clso.params import load_params
from clso.progress import progress_bar
from clso.search.problem import build_search, sample_for_surrogate
from clso.search.surrogate import INPUTS, Surrogate, SurrogateConfig, ranking_metrics
from clso.search.workers import search_pool, with_workers
from stages.common import PARAMS_OPTION, run_alone, stage

OUT_DIR = Path("models/surrogate")
METRICS = Path("metrics/surrogate.json")


def surrogate_config(p, gene_buckets, library_size, inputs: str, n_features: int) -> SurrogateConfig:
    s = p.surrogate
    return SurrogateConfig(gene_buckets, library_size, inputs=inputs, n_features=0 if inputs == "index" else n_features,
                           embed_dim=s.embed_dim, hidden=s.hidden, depth=s.depth, ensemble=s.ensemble,
                           ranking=s.ranking, mse_weight=s.mse_weight, lr=s.lr, steps=s.steps)


def _trained(p, search, features, inputs, genomes, losses) -> Surrogate:
    model = Surrogate(surrogate_config(p, search.gene_buckets, search.library.size, inputs, features.shape[-1]),
                      seed=derive_seed(p.base.seed, "surrogate-init"), features=features, device=search.batch.x.device)
    model.fit(genomes, losses, seed=derive_seed(p.base.seed, "surrogate-fit"))
    return model


@stage("surrogate", sections=("base", "model", "fitness", "surrogate", "evolve"))
def surrogate(params: Path = PARAMS_OPTION) -> None:
    """Sample surrogate.n_train genomes (random, then mutants of the best), score them on the
    fitness batch, train the surrogate on all but a held-out share, and write
    models/surrogate/ and metrics/surrogate.json."""
    p = load_params(params)
    device = setup(p.base)
    energy = dict(device=device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts)
    search = build_search("data/prepared", "models/library", p.model, fitness_batch_size=p.fitness.batch_size,
                          seed=p.base.seed, device=device, precision=resolve_precision(p.fitness.precision, device))
    rng = np.random.default_rng(derive_seed(p.base.seed, "surrogate"))
    pool = search_pool(search, p.evolve.workers, p.evolve.address or None, energy)
    start_up = pool.take_start_up() if pool is not None else None  # the driver waited for its actors
    try:
        with EnergyMeter(**energy) as eval_meter, progress_bar() as bar:
            task = bar.add_task("evaluate genomes", total=p.surrogate.n_train, info="")
            genomes, losses = sample_for_surrogate(search, p.surrogate.n_train, p.surrogate.mutant_fraction, rng,
                                                   on_progress=lambda k: bar.advance(task, k))
        workers = search.evaluator.take_worker_readings()  # up to now: the actors' idle time included
    finally:
        if pool is not None:
            pool.close()
    evaluation = with_workers(eval_meter.reading.plus(start_up) if start_up else eval_meter.reading, workers)
    order = rng.permutation(len(genomes))
    n_hold = max(2, int(round(p.surrogate.holdout_fraction * len(genomes))))
    held, train = order[:n_hold], order[n_hold:]
    features = structure_features(search.library.manifest)
    with EnergyMeter(**energy) as train_meter:
        model = _trained(p, search, features, p.surrogate.inputs, genomes[train], losses[train])
    finite = np.isfinite(losses[held])

    def held_out(m: Surrogate) -> dict:
        return ranking_metrics(m.predict(genomes[held][finite])[0], losses[held][finite])

    # the other ways to describe a gene, trained on the same split: a diagnostic, charged to no one
    with EnergyMeter(**energy) as compare_meter:
        by_inputs = {inputs: held_out(model) if inputs == p.surrogate.inputs
                     else held_out(_trained(p, search, features, inputs, genomes[train], losses[train]))
                     for inputs in INPUTS}
    with atomic_dir(OUT_DIR) as tmp:
        save_file(model.state_dict(), str(tmp / "surrogate.safetensors"), metadata={"clso": "surrogate/1"})
        write_json_atomic(tmp / "surrogate.json", dataclasses.asdict(model.config))
        write_json_atomic(tmp / "data.json", {"genomes": genomes.tolist(),
                                              "losses": [float(x) if np.isfinite(x) else "inf" for x in losses],
                                              "holdout": sorted(held.tolist())})
    metrics = {
        "device": str(device), "precision": search.precision, "genomes": len(genomes), "train": len(train), "holdout": len(held),
        "inputs": p.surrogate.inputs, "holdout_metrics": by_inputs[p.surrogate.inputs],
        "holdout_spearman_by_inputs": {k: v["spearman"] for k, v in by_inputs.items()},
        "inputs_comparison_cost": compare_meter.reading.as_metrics(),
        "best_loss": float(losses.min()), "median_loss": float(np.median(losses)),
        "unfit": int((~np.isfinite(losses)).sum()),
        "evaluation": {**evaluation.as_metrics(), "flops": search.evaluator.flops,
                       **({"workers": p.evolve.workers, "workers_extra_flops": search.evaluator.worker_extra_flops}
                          if pool is not None else {})},
        "training": {**train_meter.reading.as_metrics(), "flops": model.training_flops(len(train))},
    }
    write_json_atomic(METRICS, metrics)
    m = metrics["holdout_metrics"]
    print(f"surrogate: {len(genomes)} genomes, held-out Spearman {m['spearman']:.3f} "
          f"(protocol bar 0.7), Kendall {m['kendall_tau']:.3f}, top-10% recall {m['top10_recall']:.2f}; Spearman by "
          f"inputs: {', '.join(f'{k} {v:.3f}' for k, v in metrics['holdout_spearman_by_inputs'].items())}")


if __name__ == "__main__":
    run_alone("surrogate")
