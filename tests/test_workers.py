"""evolve.workers: the true evaluations on a local Ray cluster of 2 CPU actors give the search the
same results as in process, resume, and survive a killed actor."""

import os
import signal

import numpy as np
import pytest

from clso.params import EvolveParams, defaults
from clso.search.evolve import Evolution
from clso.search.problem import build_search, sample_for_surrogate
from clso.search.surrogate import Surrogate, SurrogateConfig
from clso.search.workers import search_pool
from tests.test_evolve import without_timing

ray = pytest.importorskip("ray")  # pip install -e ".[ray]"; CI installs it


@pytest.fixture(scope="module")
def cluster():
    # a GPU it does not have: a search on the CPU must still get CPU actors, 2 of them
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _evolution(root, model, folder, workers=0):
    search = build_search(root / "prepared", root / "library", model, fitness_batch_size=2, seed=0, device="cpu")
    genomes, losses, _ = sample_for_surrogate(search, 20, 0.5, np.random.default_rng(0))
    surrogate = Surrogate(SurrogateConfig(search.gene_buckets, 10, steps=20), seed=0)
    surrogate.fit(genomes, losses)
    cfg = EvolveParams(**{**defaults(EvolveParams).__dict__, "population": 8, "generations": 5, "hybrid_every": 2,
                          "hybrid_steps": 2, "hybrid_batch_size": 2, "local_search_every": 3, "local_search_top": 2,
                          "surrogate_every": 2, "workers": workers})
    search_pool(search, workers, None, dict(cpu_watts_per_core=10.0))
    return Evolution(search, cfg, surrogate, (genomes, losses), 0, folder, "fp", dict(device="cpu"), mode="hybrid")


def _same_search(a, b):
    """The same search, FLOPs included (charged as one process computes them), timing aside."""
    np.testing.assert_array_equal(a.ga_state.best_genome, b.ga_state.best_genome)
    assert a.ga_state.best_fitness == b.ga_state.best_fitness
    assert without_timing(a.history) == without_timing(b.history)


def test_two_workers_find_what_one_process_finds_and_are_charged_their_energy(cluster, tiny_gpt2_search, tmp_path,
                                                                              monkeypatch):
    from clso.search.evolve import Totals

    root, model = tiny_gpt2_search
    alone = _evolution(root, model, tmp_path / "alone")
    in_process = alone.run_to_end()
    distributed = _evolution(root, model, tmp_path / "workers", workers=2)
    evaluator, taken, charged = distributed.search.evaluator, [], []
    real_take, real_plus = evaluator.take_worker_readings, Totals.plus

    def take():  # what the search is handed of its actors' readings
        readings = real_take()
        taken.extend(readings)
        return readings

    def plus(self, search, checkpoints=None, workers=()):
        charged.append(list(workers))
        return real_plus(self, search, checkpoints, workers)

    evaluator.take_worker_readings = take
    monkeypatch.setattr(Totals, "plus", plus)
    try:
        on_workers = distributed.run_to_end()
        assert distributed.search.evaluator.pool.version >= 2  # hybrid: the weights after each Adam phase went out
    finally:
        distributed.search.evaluator.pool.close()
    _same_search(in_process, on_workers)
    # the cache in the same order too: the surrogate is retrained on it in that order
    assert list(distributed.search.evaluator.cache.items()) == list(alone.search.evaluator.cache.items())
    # every actor reading reaches the totals, each once: the last totals of the run hold their sum
    assert len(taken) >= 2 and all(r.cpu_s >= 0 for r in taken) and sum(r.cpu_s for r in taken) > 0
    (summed,) = charged[-1]
    assert summed.cpu_s == pytest.approx(sum(r.cpu_s for r in taken))
    assert summed.energy_wh == pytest.approx(sum(r.energy_wh for r in taken))
    assert distributed.cost.workers_extra_flops == distributed.search.evaluator.worker_extra_flops


def test_actors_score_on_the_drivers_model_as_it_is_without_its_files(cluster, tiny_gpt2_search, tmp_path):
    import shutil

    import torch

    from clso.search.evaluate import population_losses_and_flops, trie_flops
    from clso.search.workers import RayPool

    root, model = tiny_gpt2_search
    copied = tmp_path / "copied"
    shutil.copytree(root, copied)
    search = build_search(copied / "prepared", copied / "library", model, fitness_batch_size=2, seed=0, device="cpu")
    with torch.no_grad():  # continuous weights no seed gives: the actors must get them from the driver
        search.model.gpt2.transformer.wte.weight.mul_(1.5)
    shutil.rmtree(copied)
    genomes = np.random.default_rng(0).integers(0, search.library.size, size=(6, search.genome_length))
    genomes[:, 0] = 0  # the two shards share their first gene: each computes it
    genomes = np.unique(genomes, axis=0)
    pool = RayPool(2, search.model, search.batch, "fp32", {})
    try:
        losses, flops = pool.losses_and_flops(genomes)
        assert pool.device_type == "cpu" and all(gpu is None for _, _, gpu in pool.places)
        # a reading with each shard, and each actor read up to now; the driver's of the start-up, once
        readings = pool.take_readings()
        assert len(readings) == 2 + 2 and pool.take_readings() != [] and pool.readings == []
        start_up = pool.take_start_up()
        assert start_up.wall_s > 0 and start_up.energy_wh > 0 and pool.take_start_up() is None
    finally:
        pool.close()
    expected, one_process = population_losses_and_flops(search.model, genomes, search.batch)
    np.testing.assert_array_equal(losses, expected)
    assert flops > one_process == trie_flops(search.model, genomes, search.batch)


def test_a_cluster_without_free_cpus_or_a_second_address_is_one_line_not_a_hang(cluster, monkeypatch):
    from clso import ClsoError
    from clso.bench import bench_model_and_batch
    from clso.search import workers

    model, batch = bench_model_and_batch("cpu", n_embd=16, n_layer=1, n_head=2, batch_size=2, block_size=8,
                                         library_size=4, vocab_size=32, seed=0)
    with pytest.raises(ClsoError, match="already connected to a Ray cluster"):
        workers.RayPool(1, model, batch, "fp32", {}, address="auto")
    with pytest.raises(ClsoError, match="has 2 CPUs for one each"):
        workers.RayPool(3, model, batch, "fp32", {})
    holder = workers.RayPool(2, model, batch, "fp32", {})  # both CPUs taken
    monkeypatch.setattr(workers, "START_TIMEOUT_S", 2)

    def hung(*_):
        pytest.fail("the pool's start-up waited past its time limit")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(ClsoError, match="not up after 2 s: the Ray cluster has no free CPU"):
            workers.RayPool(1, model, batch, "fp32", {})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        holder.close()


def test_totals_add_the_actors_energy_and_cpu_time_but_not_their_wall_time():
    from clso.energy import EnergyReading
    from clso.search.evolve import Totals

    driver = EnergyReading(1.0, "estimate", 10.0, 4.0, 1.0, "estimate")
    actor = EnergyReading(0.5, "nvml+estimate", 9.0, 3.0, 0.2, "estimate", 0.3, "nvml")
    t = Totals().plus(driver, None, [actor, actor])
    assert t.energy_j == pytest.approx(2.0 * 3600) and t.cpu_s == 10.0 and t.wall_s == 10.0
    assert t.gpu_j == pytest.approx(0.6 * 3600) and t.methods == ["estimate", "nvml+estimate"]


def test_a_run_resumes_with_another_number_of_workers_and_a_worker_killed_mid_generation_is_replaced(
        cluster, tiny_gpt2_search, tmp_path):
    root, model = tiny_gpt2_search
    whole = _evolution(root, model, tmp_path / "whole").run_to_end()
    first = _evolution(root, model, tmp_path / "ckpt", workers=2)
    pool = first.search.evaluator.pool
    real_submit, killed = pool._submit, []

    def submit_then_kill(i, shard):  # the actor dies with its shard in flight
        ref = real_submit(i, shard)
        if not killed:
            killed.append(pool.places[i][0])
            os.kill(pool.places[i][0], signal.SIGKILL)
        return ref

    pool._submit = submit_then_kill
    try:
        with pytest.raises(KeyboardInterrupt):
            first.run_to_end(stop_after=2)
    finally:
        pool.close()
    assert killed and first.cost.workers_replaced == pool.replaced >= 1
    resumed = _evolution(root, model, tmp_path / "ckpt", workers=1)
    assert len(resumed.run.history) == 2  # resumed, not started afresh, and the workers counts with it
    assert resumed.run.totals.workers_replaced == first.cost.workers_replaced
    assert resumed.run.totals.workers_extra_flops == first.cost.workers_extra_flops
    try:
        run = resumed.run_to_end()
    finally:
        resumed.search.evaluator.pool.close()
    _same_search(whole, run)


def test_the_workers_benchmark_reports_scaling_against_one_worker(cluster):
    from clso.bench import bench_eval_workers

    out = bench_eval_workers(2, n_embd=16, n_layer=1, n_head=2, population=12, batch_size=2, block_size=16,
                             library_size=12, vocab_size=64, repeats=1)
    assert out["losses_identical"] and out["config"]["population"] == 12 and out["cluster"]["cpus"] == 2
    assert out["workers_genomes_per_s"] > 0 and out["one_worker_genomes_per_s"] > 0
    assert out["workers_flops"] >= out["one_worker_flops"] > 0


def test_an_actor_adds_no_energy_that_the_drivers_own_meter_already_holds():
    from clso.energy import EnergyReading
    from clso.search.workers import RayPool

    pool = RayPool.__new__(RayPool)  # its accounting alone: no actors needed
    reading = EnergyReading(0.5, "nvml+estimate", 2.0, 1.5, 0.2, "estimate", 0.3, "nvml")
    pool.driver = ("here", True, None)  # the driver reads RAPL on this machine: it holds the actor's CPU part
    here = pool.charged(reading, (1, "here", "GPU-a"))
    assert (here.energy_wh, here.cpu_wh, here.gpu_wh, here.method) == (0.3, 0.0, 0.3, "nvml+rapl")
    assert pool.charged(reading, (1, "elsewhere", "GPU-a")) == reading
    pool.driver = ("here", False, "GPU-a")  # the driver estimates its CPU, but meters the actor's GPU
    same_gpu = pool.charged(reading, (1, "here", "GPU-a"))
    assert (same_gpu.energy_wh, same_gpu.cpu_wh, same_gpu.gpu_wh) == (0.2, 0.2, 0.0)
    assert pool.charged(reading, (1, "here", "GPU-b")) == reading
