"""True evaluations on Ray actors (params `evolve.workers`, `evolve.address`): a pool of actors,
each of which builds the model and fitness batch once (for evolve, clso.search.model_and_batch: from
the same files and seed as the driver) and then scores the genomes it is sent.

What travels: genomes as int64 index vectors, one contiguous shard of the generation's sorted
distinct genomes per actor; losses, the FLOPs computed and the actor's own energy reading come back.
The continuous weights (what hybrid mode trains) travel once per change: the driver puts them in
Ray's object store under a version number and an actor loads them when its version is older.

The losses do not depend on the number of actors on a CPU: there each network is walked alone
(clso.evaluate.default_max_networks), so a genome's loss is computed by the same operations whatever
shard it is in. A shard boundary costs its prefix: the FLOPs (and energy) of N workers are those
they really computed, a little more than one process's.

An actor that dies (its process killed, its node lost) is replaced and its shard sent again: nothing
is lost. Ray is imported here only, and only when a pool is made (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import functools
import socket
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from clso import ClsoError
from clso.energy import EnergyMeter, EnergyReading, RaplCounter

RETRIES = 3  # times one shard is sent again after its actor died
NO_RAPL = Path("/nonexistent/powercap")  # an actor meters its CPU by its own CPU time: actors never count each other


def search_pool(search, workers: int, address: str | None, *, data_dir, library_dir, model, fitness_batch_size: int,
                seed: int, meter_options: dict) -> RayPool | None:
    """`workers` Ray actors for the true evaluations of `search` (clso.search.build_search of these
    arguments), set on its evaluator; None with 0 workers: in this process. Close it when done."""
    if not workers:
        return None
    from clso.search import model_and_batch

    build = functools.partial(model_and_batch, data_dir=Path(data_dir).resolve(), library_dir=Path(library_dir).resolve(),
                              model=model, fitness_batch_size=fitness_batch_size, seed=seed, precision=search.precision)
    search.evaluator.pool = RayPool(workers, build, search.precision, meter_options, address)
    return search.evaluator.pool


def with_workers(driver: EnergyReading, workers: list[EnergyReading]) -> EnergyReading:
    """The driver's reading with its workers' energy and CPU time added (their methods joined);
    the wall time is the driver's: the workers' ran beside it."""
    parts = [driver, *workers]
    joined = lambda methods: "|".join(sorted(set(methods) - {None})) or None  # noqa: E731
    return EnergyReading(sum(r.energy_wh for r in parts), joined(r.method for r in parts), driver.wall_s,
                         sum(r.cpu_s for r in parts), sum(r.cpu_wh for r in parts), joined(r.cpu_method for r in parts),
                         sum(r.gpu_wh for r in parts), joined(r.gpu_method for r in parts))


class EvaluationWorker:
    """One actor's state: the model (with its library) and fitness batch that `build(device)` made,
    and the version of the continuous weights it holds."""

    def __init__(self, build, precision: str, meter_options: dict):
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray gave it one GPU, or one CPU
        torch.set_num_threads(1)  # its CPU share (on a GPU: one thread, as clso.context.setup keeps)
        self.model, self.batch = build(device)
        self.precision, self.meter_options = precision, {**meter_options, "device": device, "rapl_root": NO_RAPL}
        self.version = -1

    def pid(self) -> int:
        import os

        return os.getpid()

    def evaluate(self, genomes: np.ndarray, version: int, state_box: list) -> tuple[np.ndarray, int, dict, str]:
        """Losses and FLOPs of `genomes`, the energy this actor spent on them, and its host. `state_box` holds
        the object reference of the continuous weights of `version` (boxed, so Ray fetches it only
        when this actor needs it)."""
        import ray

        from clso.evaluate import population_losses_and_flops

        with EnergyMeter(**self.meter_options) as meter:
            if version != self.version and state_box[0] is not None:
                self.model.load_continuous_state(ray.get(state_box[0]))
                self.version = version
            losses, flops = population_losses_and_flops(self.model, genomes, self.batch, precision=self.precision)
        return losses, flops, asdict(meter.reading), socket.gethostname()


class RayPool:
    """`workers` actors on a Ray cluster: a local one started here (address None) or the one at
    `address` ("auto", or "ray://host:10001"). `build(device)` (picklable: it travels to the actors)
    returns the model and fitness batch each actor evaluates on, in `precision`."""

    def __init__(self, workers: int, build, precision: str, meter_options: dict, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ClsoError('evolve.workers > 0 needs Ray: pip install -e ".[ray]"') from None
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ClsoError(f"evolve.address {address!r}: no Ray cluster there ({e}); start one with "
                                "`ray start --head`, or set evolve.address to null for a local one") from None
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self._actor = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_restarts=0)(EvaluationWorker)
        self.build, self.precision, self.meter_options = build, precision, meter_options
        # the driver's meter reads RAPL where this machine lets it: the whole package, actors here included
        self.host, self.driver_rapl = socket.gethostname(), RaplCounter.open() is not None
        self.actors = [self._spawn() for _ in range(workers)]
        self.version, self.state_ref = -1, None
        self.replaced = 0  # actors that died and were replaced

    def _spawn(self):
        return self._actor.remote(self.build, self.precision, self.meter_options)

    def __len__(self) -> int:
        return len(self.actors)

    def set_weights(self, state: dict) -> None:
        """The continuous weights the next evaluations must use (a new version)."""
        self.version += 1
        self.state_ref = self.ray.put({k: v.detach().cpu() for k, v in state.items()})

    def losses_and_flops(self, genomes: np.ndarray, actors: int | None = None
                         ) -> tuple[np.ndarray, int, list[EnergyReading]]:
        """Losses of sorted distinct `genomes`, split in contiguous shards over the actors (the first
        `actors` of them: a benchmark's one-worker side); the FLOPs and one energy reading per shard."""
        shards = [s for s in np.array_split(genomes, actors or len(self.actors)) if len(s)]
        pending = {self._submit(i, shard): (i, shard, 0) for i, shard in enumerate(shards)}
        results: dict[int, tuple] = {}
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            ref = done[0]
            i, shard, tries = pending.pop(ref)
            try:
                results[i] = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError):
                if tries == RETRIES:
                    raise ClsoError(f"evaluation worker died {RETRIES + 1} times on one shard; see the Ray logs") from None
                self.actors[i % len(self.actors)] = self._spawn()
                self.replaced += 1
                pending[self._submit(i, shard)] = (i, shard, tries + 1)
        losses = np.concatenate([results[i][0] for i in range(len(shards))])
        return losses, sum(results[i][1] for i in range(len(shards))), [self.charged(EnergyReading(**results[i][2]),
                                                                                     results[i][3])
                                                                        for i in range(len(shards))]

    def charged(self, reading: EnergyReading, host: str) -> EnergyReading:
        """An actor's reading as the search is charged it: on the driver's machine with RAPL readable,
        the package counter the driver reads already holds the actor's CPU energy, so only its GPU
        part is added."""
        if host != self.host or not self.driver_rapl:
            return reading
        return replace(reading, energy_wh=reading.gpu_wh, cpu_wh=0.0, cpu_method="rapl",
                       method=f"{reading.gpu_method}+rapl" if reading.gpu_method else "rapl")

    def _submit(self, i: int, shard: np.ndarray):
        return self.actors[i % len(self.actors)].evaluate.remote(shard, self.version, [self.state_ref])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_here:
            self.ray.shutdown()
