"""True evaluations on Ray actors (params `evolve.workers`, `evolve.address`): a pool of actors,
each of which receives the model (its library included) and the fitness batch once, through Ray's
object store, and then scores the genomes it is sent. No node needs the driver's files.

What travels: genomes as int64 index vectors, one contiguous shard of the generation's sorted
distinct genomes per actor; losses, the FLOPs computed and the actor's own energy reading come back.
The continuous weights (what hybrid mode trains) travel once per change: the driver puts them in
Ray's object store under a version number and an actor loads them when its version is older.

The losses do not depend on the number of actors on a CPU: there each network is walked alone
(clso.search.evaluate.default_max_networks), so a genome's loss is computed by the same operations whatever
shard it is in. On a GPU, 64 networks go side by side and a shard boundary changes how they are
batched: the losses agree up to that batching's rounding. A shard boundary also costs its prefix:
the FLOPs (and energy) of N workers are those they really computed, a little more than one process's.

Each actor meters its life from its constructor on (building its model included) and hands over
what it spent since it was last read, with each result and whenever the search takes its workers'
readings (once a generation): the GPU it holds is charged while idle too. The pool's start-up is
metered on the driver (`take_start_up`), whose search meter is not running yet. Not charged: an
actor's process start before its constructor (unless the driver's RAPL holds it), and what it spent
after its last reading when it dies or when the pool is closed (after the search's last generation). Its CPU is metered by
its own CPU time (never by the machine-wide RAPL counter, so actors never count each other); the
driver drops what its own meter already holds: an actor's CPU part on the driver's machine when the
driver reads RAPL, and an actor's GPU part when it holds the driver's own GPU (a local cluster may
give an actor the driver's GPU: they then share it).

An actor that dies (its process killed, its node lost) is killed for good, replaced, and its shard
sent again: nothing is lost. Ray is imported here only, and only when a pool is made (`pip install -e ".[ray]"`).

The actors run where the driver's search runs: one GPU each when its batch is on a GPU, one CPU
(never a GPU it might see) when on a CPU, so that the precision `auto` gave and the batching of
networks side by side are the driver's.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from clso import ClsoError
from clso.energy import RAPL_ROOT, EnergyMeter, EnergyReading, RaplCounter

RETRIES = 3  # times one shard is sent again after its actor died
START_TIMEOUT_S = 600  # an actor not up by then has no free GPU/CPU (Ray would wait forever)
NO_RAPL = Path("/nonexistent/powercap")  # an actor meters its CPU by its own CPU time: actors never count each other


def search_pool(search, workers: int, address: str | None, meter_options: dict) -> RayPool | None:
    """`workers` Ray actors for the true evaluations of `search` (a clso.search.problem.Search), set on its
    evaluator; None with 0 workers: in this process. Close it when done."""
    if not workers:
        return None
    search.evaluator.pool = RayPool(workers, search.model, search.batch, search.precision, meter_options, address)
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
    """One actor's state: its copy of the model (with its library) and fitness batch on its device,
    the version of the continuous weights it holds, and its meter."""

    def __init__(self, shipped: dict, precision: str, meter_options: dict, device_type: str):
        import torch

        device = torch.device(device_type)  # "cuda": the one GPU Ray gave it
        self.meter = EnergyMeter(**{**meter_options, "device": device, "rapl_root": NO_RAPL}).__enter__()
        start = self.meter.read()
        self.charged_until = start.minus(start)  # zero: from the meter's start, building the model included
        torch.set_num_threads(1)  # its CPU share (on a GPU: one thread, as clso.context.setup keeps)
        self.model, self.batch = _unpacked(shipped, device)
        self.precision, self.version = precision, -1
        self.place = (socket.gethostname(), _gpu_uuid(device))

    def where(self) -> tuple[int, str, str | None]:
        """Its process id, host and GPU: that it is up, and whose meter already holds it."""
        import os

        return os.getpid(), *self.place

    def evaluate(self, genomes: np.ndarray, version: int, state_box: list) -> tuple[np.ndarray, int, dict]:
        """Losses and FLOPs of `genomes`, and the energy this actor spent since its last call. `state_box`
        holds the object reference of the continuous weights of `version` (boxed, so Ray fetches it
        only when this actor needs it)."""
        import ray

        from clso.search.evaluate import population_losses_and_flops

        if version != self.version and state_box[0] is not None:
            self.model.load_continuous_state(ray.get(state_box[0]))
            self.version = version
        losses, flops = population_losses_and_flops(self.model, genomes, self.batch, precision=self.precision)
        return losses, flops, self.spent()

    def spent(self) -> dict:
        """The energy this actor spent since it was last read."""
        now = self.meter.read()
        spent, self.charged_until = now.minus(self.charged_until), now
        return asdict(spent)


def _shippable(model, batch) -> dict:
    """What an actor builds its model and batch from, on the host: the model's parts, not the model
    (whose library may sit on the driver's GPU)."""
    return {"config": model.config, "mode": model.mode, "library": model.library.to("cpu"),
            "state": {k: v.cpu() for k, v in model.continuous_state().items()},
            "batch": replace(batch, x=batch.x.cpu(), y=batch.y.cpu())}


def _unpacked(shipped: dict, device):
    from clso.model.crystalline import CrystallineGPT2

    model = CrystallineGPT2(shipped["config"], shipped["library"], mode=shipped["mode"])
    model.load_continuous_state(shipped["state"])
    batch = shipped["batch"]
    return model.to(device).eval(), replace(batch, x=batch.x.to(device), y=batch.y.to(device))


def _gpu_uuid(device) -> str | None:
    import torch

    return str(torch.cuda.get_device_properties(device).uuid) if torch.device(device).type == "cuda" else None


class RayPool:
    """`workers` actors on a Ray cluster: a local one started here (address None) or the one at
    `address` ("auto" on a node of the cluster; "ray://host:10001" from elsewhere, with
    `pip install "ray[client]"`). Each evaluates on a copy of `model` (a CrystallineGPT2, its
    continuous weights as they are now) and `batch`, in `precision`, on the kind of device `batch`
    is on. `meter_options` are the driver's EnergyMeter's."""

    def __init__(self, workers: int, model, batch, precision: str, meter_options: dict, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ClsoError('evolve.workers > 0 needs Ray: pip install -e ".[ray]"') from None
        self.ray, self.actors, self.readings, self.start_up = ray, [], [], None
        self.started_here = not ray.is_initialized()
        if address and not self.started_here:
            raise ClsoError(f"evolve.address {address!r}: this process is already connected to a Ray cluster; "
                            "leave evolve.address empty to use it")
        if self.started_here:
            try:
                ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
                raise ClsoError(f"{where} could not be reached or started ({str(e).splitlines()[0]}); for a "
                                "cluster run `ray start --head` there and set evolve.address") from None
        try:
            self.device_type = batch.x.device.type
            gpus = int(self.device_type == "cuda")
            kind = "GPU" if gpus else "CPU"
            have = ray.cluster_resources().get(kind, 0)  # held by another job: the start-up's timeout says so
            if have < workers:
                raise ClsoError(f"evolve.workers {workers}: the Ray cluster has {have:g} {kind}s for one each "
                                f"(the search runs on {'a GPU' if gpus else 'the CPU'}); lower it or grow the cluster")
            self._actor = ray.remote(num_cpus=1 - gpus, num_gpus=gpus, max_restarts=0)(EvaluationWorker)
            with EnergyMeter(**meter_options) as start_up:  # the driver's meter of the search is not running yet
                self.shipped = self._put(_shippable(model, batch))  # once: every actor, replacements too, reads it
                self.precision, self.meter_options = precision, meter_options
                self.driver = self._driver_place(meter_options)
                self.actors = [self._spawn() for _ in range(workers)]
                self.places = self._started(self.actors)
            self.start_up = start_up.reading
        except BaseException:
            self.close()
            raise
        self.version, self.state_ref = -1, None
        self.replaced = 0  # actors that died and were replaced

    @staticmethod
    def _driver_place(meter_options: dict) -> tuple[str, bool, str | None]:
        """The driver's host, whether its meter reads RAPL (the whole package: actors there
        included), and the GPU its meter reads."""
        device, rapl = str(meter_options.get("device", "cpu")), RaplCounter.open(meter_options.get("rapl_root", RAPL_ROOT))
        return socket.gethostname(), rapl is not None, _gpu_uuid(device) if device.startswith("cuda") else None

    def _put(self, value):
        try:
            return self.ray.put(value)
        except self.ray.exceptions.RayError as e:  # the object store is full, say
            raise ClsoError(f"Ray could not store what the evaluation workers need: {_first_line(e)}") from None

    def _spawn(self):
        return self._actor.remote(self.shipped, self.precision, self.meter_options, self.device_type)

    def _started(self, actors: list) -> list[tuple]:
        """Each actor's (pid, host, GPU) once its model is built; a failure to build is one line."""
        try:
            return self.ray.get([a.where.remote() for a in actors], timeout=START_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise ClsoError(f"evaluation workers not up after {START_TIMEOUT_S} s: the Ray cluster has no free "
                            f"{'GPU' if self.device_type == 'cuda' else 'CPU'} for them (another job holds "
                            "them, or a node is gone); free some or lower evolve.workers") from None
        except self.ray.exceptions.RayError as e:
            raise ClsoError(f"an evaluation worker could not start: {_first_line(e)}") from None

    def __len__(self) -> int:
        return len(self.actors)

    def set_weights(self, state: dict) -> None:
        """The continuous weights the next evaluations must use (a new version)."""
        self.version += 1
        self.state_ref = self._put({k: v.detach().cpu() for k, v in state.items()})

    def losses_and_flops(self, genomes: np.ndarray, actors: int | None = None) -> tuple[np.ndarray, int]:
        """Losses of sorted distinct `genomes`, split in contiguous shards over the actors (the first
        `actors` of them: a benchmark's one-worker side), and the FLOPs they computed. The actors'
        energy readings wait in the pool for `take_readings`."""
        shards = [s for s in np.array_split(genomes, actors or len(self.actors)) if len(s)]
        pending = {self._submit(i, shard): (i, shard, 0) for i, shard in enumerate(shards)}
        results: dict[int, tuple] = {}
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            i, shard, tries = pending.pop(done[0])
            try:
                results[i] = self.ray.get(done[0])
            except self.ray.exceptions.RayActorError:  # its process or node is gone (or unreachable)
                if tries == RETRIES:
                    raise ClsoError(f"evaluation workers died {RETRIES + 1} times on one shard") from None
                self._replace(i)
                pending[self._submit(i, shard)] = (i, shard, tries + 1)
            except self.ray.exceptions.RayError as e:  # it raised, or Ray lost an object or ran out of memory
                raise ClsoError(f"an evaluation worker failed: {_first_line(e)}") from None
        self.readings += [self.charged(EnergyReading(**results[i][2]), self.places[i]) for i in range(len(shards))]
        return np.concatenate([results[i][0] for i in range(len(shards))]), sum(results[i][1] for i in results)

    def take_start_up(self) -> EnergyReading | None:
        """The driver's reading of the pool's start-up (its wall time too: the driver waited), once."""
        taken, self.start_up = self.start_up, None
        return taken

    def take_readings(self) -> list[EnergyReading]:
        """The actors' energy readings not yet taken: each evaluation's, and what each actor spent
        since (idle on its GPU, say). What an actor found dead spent since its last reading is lost
        with it (the next evaluation replaces it)."""
        refs = [actor.spent.remote() for actor in self.actors]
        for i, ref in enumerate(refs):
            try:
                self.readings.append(self.charged(EnergyReading(**self.ray.get(ref)), self.places[i]))
            except self.ray.exceptions.RayActorError:
                pass
            except self.ray.exceptions.RayError as e:
                raise ClsoError(f"an evaluation worker failed: {_first_line(e)}") from None
        taken, self.readings = self.readings, []
        return taken

    def _replace(self, i: int) -> None:
        self.ray.kill(self.actors[i], no_restart=True)  # an unreachable one would hold its GPU
        self.actors[i] = self._spawn()
        self.places[i] = self._started([self.actors[i]])[0]
        self.replaced += 1

    def charged(self, reading: EnergyReading, place: tuple) -> EnergyReading:
        """An actor's reading as the search is charged it, less what the driver's meter already holds:
        on the driver's machine, its CPU part when the driver reads RAPL, and its GPU part when it
        holds the driver's GPU."""
        _, host, gpu = place
        driver_host, driver_rapl, driver_gpu = self.driver
        if host != driver_host:
            return reading
        cpu_counted, gpu_counted = driver_rapl, gpu is not None and gpu == driver_gpu
        cpu_wh, gpu_wh = (0.0 if cpu_counted else reading.cpu_wh), (0.0 if gpu_counted else reading.gpu_wh)
        cpu_method = "rapl" if cpu_counted else reading.cpu_method
        method = cpu_method if reading.gpu_method is None else f"{reading.gpu_method}+{cpu_method}"
        return replace(reading, energy_wh=cpu_wh + gpu_wh, cpu_wh=cpu_wh, gpu_wh=gpu_wh, cpu_method=cpu_method,
                       method=method)

    def _submit(self, i: int, shard: np.ndarray):
        return self.actors[i].evaluate.remote(shard, self.version, [self.state_ref])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
