"""Stage `surrogate`: truly evaluate genomes, pretrain the ranking surrogate, and report how well
it ranks genomes it has not seen."""

from pathlib import Path

import numpy as np

from clso.context import derive_seed, resolve_precision, setup
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_json_atomic
from clso.model.library import structure_features
from clso.params import load_params
from clso.progress import progress_bar
from clso.search.problem import build_search, sample_for_surrogate, split_by_family
from clso.search.surrogate import INPUTS, Surrogate, SurrogateConfig, ranking_metrics
from clso.search.workers import search_pool, with_workers
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import LIBRARY, PREPARED, SURROGATE, detail, metrics


def _trained(p, search, features, inputs, genomes, losses) -> Surrogate:
    s = p.surrogate
    config = SurrogateConfig(search.gene_buckets, search.library.size, inputs=inputs,
                             n_features=0 if inputs == "index" else features.shape[-1], embed_dim=s.embed_dim,
                             hidden=s.hidden, depth=s.depth, ensemble=s.ensemble, ranking=s.ranking,
                             mse_weight=s.mse_weight, lr=s.lr, steps=s.steps)
    model = Surrogate(config, seed=derive_seed(p.base.seed, "surrogate-init"), features=features,
                      device=search.batch.x.device)
    model.fit(genomes, losses, seed=derive_seed(p.base.seed, "surrogate-fit"))
    return model


def _sample(p, search, rng, device) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """surrogate.n_train genomes truly evaluated (on Ray actors with evolve.workers), and what that cost."""
    meter = p.base.meter_options(device)
    pool = search_pool(search, p.evolve.workers, p.evolve.address or None, meter)
    start_up = pool.take_start_up() if pool is not None else None  # the driver waited for its actors
    try:
        with EnergyMeter(**meter) as eval_meter, progress_bar() as bar:
            task = bar.add_task("evaluate genomes", total=p.surrogate.n_train, info="")
            genomes, losses, families = sample_for_surrogate(search, p.surrogate.n_train, p.surrogate.mutant_fraction,
                                                             rng, on_progress=lambda k: bar.advance(task, k))
        workers = search.evaluator.take_worker_readings()  # up to now: the actors' idle time included
    finally:
        if pool is not None:
            pool.close()
    reading = with_workers(eval_meter.reading.plus(start_up) if start_up else eval_meter.reading, workers)
    cost = {**reading.as_metrics(), "flops": search.evaluator.flops, "true_evaluations": len(genomes),
            **({"workers": p.evolve.workers, "workers_extra_flops": search.evaluator.worker_extra_flops}
               if pool is not None else {})}
    return genomes, losses, families, cost


def _held_out(m: Surrogate, genomes, losses, idx: np.ndarray) -> dict | None:
    """Ranking metrics of `m` on the genomes `idx` of finite loss; None for fewer than three."""
    idx = idx[np.isfinite(losses[idx])]
    return ranking_metrics(m.predict(genomes[idx])[0], losses[idx]) if len(idx) >= 3 else None


@stage("surrogate", sections=("base", "model", "fitness", "surrogate", "evolve"))
def surrogate(params: Path = PARAMS_OPTION) -> None:
    """Sample surrogate.n_train genomes (random, then mutants of the best), score them on the
    fitness batch, train the surrogate on all but a held-out share of whole families (a random genome
    and its mutants), and write models/surrogate/, metrics/surrogate.json (its held-out Spearman, on
    random genomes and on mutants apart) and metrics/detail/surrogate.json. The other input kinds are
    compared on a split of the training families, never on the reported holdout."""
    p = load_params(params)
    device = setup(p.base)
    search = build_search(PREPARED, LIBRARY, p.model, fitness_batch_size=p.fitness.batch_size,
                          seed=p.base.seed, device=device, precision=resolve_precision(p.fitness.precision, device))
    rng = np.random.default_rng(derive_seed(p.base.seed, "surrogate"))
    genomes, losses, families, evaluation = _sample(p, search, rng, device)
    n_hold = max(2, int(round(p.surrogate.holdout_fraction * len(genomes))))
    held, train = split_by_family(families, n_hold, rng)
    features = structure_features(search.library.manifest)
    with EnergyMeter(**p.base.meter_options(device)) as train_meter:
        model = _trained(p, search, features, p.surrogate.inputs, genomes[train], losses[train])
    roots = np.zeros(len(genomes), dtype=bool)
    roots[np.unique(families, return_index=True)[1]] = True  # a family's first genome is its random one
    ranking = {"all": _held_out(model, genomes, losses, held), "random": _held_out(model, genomes, losses, held[roots[held]]),
               "mutants": _held_out(model, genomes, losses, held[~roots[held]])}
    # each input kind on a split of the training families: a diagnostic, charged to no one
    with EnergyMeter(**p.base.meter_options(device)) as compare_meter:
        picked, fit = split_by_family(families[train], n_hold, rng)
        by_inputs = {inputs: _held_out(_trained(p, search, features, inputs, genomes[train[fit]], losses[train[fit]]),
                                       genomes, losses, train[picked]) for inputs in INPUTS}
    with atomic_dir(SURROGATE) as tmp:
        model.save(tmp, genomes, losses, held)
    spearman = {f"holdout_spearman{'' if part == 'all' else '_' + part}": m and m["spearman"]
                for part, m in ranking.items()}
    write_json_atomic(metrics("surrogate"), spearman)
    write_json_atomic(detail("surrogate"), {
        "device": str(device), "precision": search.precision, "genomes": len(genomes), "train": len(train),
        "holdout": len(held), "holdout_random": int(roots[held].sum()), "holdout_mutants": int((~roots[held]).sum()),
        "families": len(np.unique(families)), "split": "by family: a random genome and its mutants on one side",
        "inputs": p.surrogate.inputs, "holdout_metrics": ranking["all"], "holdout_metrics_by_part": ranking,
        "inputs_spearman_on_training_families": {k: v and v["spearman"] for k, v in by_inputs.items()},
        "inputs_comparison_cost": compare_meter.reading.as_metrics(),
        "best_loss": float(losses.min()), "median_loss": float(np.median(losses)),
        "unfit": int((~np.isfinite(losses)).sum()),
        # shared costs: CLSO's GA is charged both
        "evaluation": evaluation,
        "training": {**train_meter.reading.as_metrics(), "flops": model.training_flops(len(train))},
    })
    parts = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} —" for k, v in spearman.items())
    print(f"surrogate: {len(genomes)} genomes in {len(np.unique(families))} families; {parts} (protocol bar 0.7)")


if __name__ == "__main__":
    run_alone("surrogate")
