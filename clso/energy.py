"""Energy, time and CPU metering around any piece of work.

    with EnergyMeter("cuda", cpu_watts_per_core=10.0) as meter:
        train()
    meter.reading.energy_wh, meter.reading.method          # e.g. 1.93, "nvml+rapl"

The CPU side is measured by RAPL package counters where /sys/class/powercap is readable, or
estimated as process CPU seconds × `cpu_watts_per_core` (the TDP-per-core method). The GPU side,
when the work ran on CUDA, comes from NVML's total-energy counter (Volta and newer), from NVML
power samples on older GPUs, or, with no NVML at all, from wall seconds × `gpu_watts`.
`method` names the source of each side as "<gpu>+<cpu>", or just "<cpu>" for CPU-only work.
RAPL counts the whole CPU package, other processes included; the estimate counts only this process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")
RAPL_POLL_S = 5.0  # a package counter wraps after minutes at full load: sample well within that
NVML_POWER_POLL_S = 0.05


@dataclass(frozen=True)
class EnergyReading:
    energy_wh: float
    method: str
    wall_s: float
    cpu_s: float
    cpu_wh: float
    cpu_method: str
    gpu_wh: float = 0.0
    gpu_method: str | None = None

    _ADDITIVE = ("energy_wh", "wall_s", "cpu_s", "cpu_wh", "gpu_wh")

    def _combined(self, other: EnergyReading, sign: int) -> EnergyReading:
        return replace(self, **{k: getattr(self, k) + sign * getattr(other, k) for k in self._ADDITIVE})

    def minus(self, other: EnergyReading) -> EnergyReading:
        """This reading less another of the same meter: the work between them, or besides them."""
        return self._combined(other, -1)

    def plus(self, other: EnergyReading) -> EnergyReading:
        return self._combined(other, +1)

    def as_metrics(self) -> dict:
        """Flat and rounded; with no GPU, the CPU part is the whole and is not repeated."""
        out = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
        if self.gpu_method is None:
            del out["gpu_wh"], out["gpu_method"], out["cpu_wh"], out["cpu_method"]
        return out


class RaplCounter:
    """Sums the top-level RAPL package domains, unwrapping each counter as it overflows."""

    def __init__(self, files: list[tuple[Path, int]]):
        self._files = files  # (energy_uj path, max_energy_range_uj)
        self._last = self._read()
        self._total_uj = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path = RAPL_ROOT) -> RaplCounter | None:
        files = []
        for domain in sorted(Path(root).glob("intel-rapl:*")):
            if domain.name.count(":") != 1:  # sub-domains (core, uncore, dram) are inside a package
                continue
            try:
                max_range = int((domain / "max_energy_range_uj").read_text())
                int((domain / "energy_uj").read_text())
            except (OSError, ValueError):
                return None  # root-only since 2020 on most kernels: one unreadable domain spoils the sum
            files.append((domain / "energy_uj", max_range))
        return cls(files) if files else None

    def _read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self._files]

    def sample(self) -> float:
        """Joules counted since the counter was opened."""
        with self._lock:
            now = self._read()
            for (_, max_range), before, after in zip(self._files, self._last, now):
                self._total_uj += after - before if after >= before else after + max_range - before
            self._last = now
            return self._total_uj / 1e6


def _import_nvml():
    try:
        import pynvml  # provided by nvidia-ml-py

        return pynvml
    except ImportError:
        return None


class NvmlCounter:
    """A GPU's energy in joules from NVML: the total-energy counter, else integrated power samples."""

    def __init__(self, nvml, handle):
        self._nvml, self._handle = nvml, handle
        self._lock = threading.Lock()
        try:
            self._start_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.method = "nvml"
        except nvml.NVMLError:  # pre-Volta GPUs have no counter
            self._start_mj = None
            self.method = "nvml-power"
            self._joules = 0.0
            self._last = (time.perf_counter(), self._power_w())

    @classmethod
    def open(cls, device_index: int, nvml=None) -> NvmlCounter | None:
        nvml = nvml or _import_nvml()
        if nvml is None:
            return None
        try:
            nvml.nvmlInit()
            return cls(nvml, _nvml_handle(nvml, device_index))
        except Exception:  # no driver library, no permission, or a GPU NVML does not know
            return None

    def _power_w(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def sample(self) -> float:
        with self._lock:
            if self._start_mj is not None:
                return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1000.0
            now, watts = time.perf_counter(), self._power_w()
            then, before = self._last
            self._joules += (now - then) * (watts + before) / 2
            self._last = (now, watts)
            return self._joules

    @property
    def needs_polling(self) -> bool:
        return self._start_mj is None


def _nvml_handle(nvml, index: int):
    # CUDA_VISIBLE_DEVICES renumbers GPUs for torch but not for NVML: match them by UUID
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(("GPU-" + uuid).encode())
    except Exception:
        return nvml.nvmlDeviceGetHandleByIndex(index)


class EnergyMeter:
    def __init__(self, device="cpu", *, cpu_watts_per_core: float = 10.0, gpu_watts: float = 300.0,
                 rapl_root: Path = RAPL_ROOT, nvml=None, synchronize=None):
        device = str(device)
        self.uses_gpu = device.startswith("cuda")
        self.device_index = int(device.split(":")[1]) if ":" in device else 0
        self.cpu_watts_per_core = cpu_watts_per_core
        self.gpu_watts = gpu_watts
        self._rapl_root = rapl_root
        self._nvml_module = nvml
        if synchronize is None and self.uses_gpu:
            import torch

            synchronize = torch.cuda.synchronize
        self._synchronize = synchronize or (lambda: None)
        self._stop = threading.Event()
        self._thread = None
        self.reading: EnergyReading | None = None

    def __enter__(self) -> EnergyMeter:
        self._synchronize()
        self._rapl = RaplCounter.open(self._rapl_root)
        self._nvml = NvmlCounter.open(self.device_index, self._nvml_module) if self.uses_gpu else None
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        if self._rapl or (self._nvml and self._nvml.needs_polling):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        last_rapl = time.perf_counter()
        while not self._stop.wait(NVML_POWER_POLL_S if self._nvml and self._nvml.needs_polling else RAPL_POLL_S):
            if self._nvml and self._nvml.needs_polling:
                self._nvml.sample()
            if self._rapl and time.perf_counter() - last_rapl >= RAPL_POLL_S:
                self._rapl.sample()
                last_rapl = time.perf_counter()

    def read(self) -> EnergyReading:
        """Everything since the meter was entered, without stopping it."""
        self._synchronize()
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        if self._rapl:
            cpu_j, cpu_method = self._rapl.sample(), "rapl"
        else:
            cpu_j, cpu_method = cpu * self.cpu_watts_per_core, "estimate"
        gpu_j, gpu_method = 0.0, None
        if self.uses_gpu:
            if self._nvml:
                gpu_j, gpu_method = self._nvml.sample(), self._nvml.method
            else:
                gpu_j, gpu_method = wall * self.gpu_watts, "estimate"
        method = cpu_method if gpu_method is None else f"{gpu_method}+{cpu_method}"
        return EnergyReading(
            energy_wh=(cpu_j + gpu_j) / 3600, method=method, wall_s=wall, cpu_s=cpu,
            cpu_wh=cpu_j / 3600, cpu_method=cpu_method, gpu_wh=gpu_j / 3600, gpu_method=gpu_method,
        )

    def __exit__(self, *exc) -> None:
        self.reading = self.read()
        self._stop.set()
        if self._thread:
            self._thread.join()
