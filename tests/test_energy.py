"""The meter's sources and fallbacks, with fake RAPL folders and a fake NVML module."""

import time

import pytest

from clso import energy
from clso.energy import EnergyMeter, RaplCounter


def burn(seconds=0.05):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def fake_rapl(root, packages):
    """packages: {name: (energy_uj, max_range_uj)}; returns a setter for the counters."""
    for name, (uj, max_range) in packages.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "energy_uj").write_text(str(uj))
        (d / "max_energy_range_uj").write_text(str(max_range))
    return lambda name, uj: (root / name / "energy_uj").write_text(str(uj))


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, counter=True, power_mw=50_000):
        self.counter, self.power_mw, self.energy_mj = counter, power_mw, 1_000_000

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise self.NVMLError("unknown uuid")

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise self.NVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw


def test_cpu_estimate_when_rapl_is_unreadable(tmp_path):
    with EnergyMeter("cpu", cpu_watts_per_core=20.0, rapl_root=tmp_path) as meter:
        burn()
    r = meter.reading
    assert r.method == "estimate" and r.cpu_method == "estimate" and r.gpu_method is None
    assert r.cpu_s >= 0.05 and r.energy_wh == pytest.approx(r.cpu_s * 20.0 / 3600)
    assert r.wall_s > 0 and set(r.as_metrics()) == {"energy_wh", "method", "wall_s", "cpu_s"}


def test_rapl_unreadable_domain_falls_back(tmp_path):
    fake_rapl(tmp_path, {"intel-rapl:0": (10, 100)})
    (tmp_path / "intel-rapl:0" / "energy_uj").chmod(0)
    (tmp_path / "intel-rapl:0" / "max_energy_range_uj").write_text("not a number")
    assert RaplCounter.open(tmp_path) is None


def test_rapl_sums_packages_ignores_subdomains_and_unwraps(tmp_path):
    set_uj = fake_rapl(tmp_path, {"intel-rapl:0": (900_000, 1_000_000), "intel-rapl:1": (0, 1_000_000),
                                  "intel-rapl:0:0": (0, 1_000_000)})
    with EnergyMeter("cpu", rapl_root=tmp_path) as meter:
        set_uj("intel-rapl:0", 100_000)  # wrapped: +200_000 µJ
        set_uj("intel-rapl:1", 500_000)  # +500_000 µJ
        set_uj("intel-rapl:0:0", 999_999)  # a sub-domain, already inside package 0
    r = meter.reading
    assert r.method == "rapl" and r.cpu_wh == pytest.approx(0.7 / 3600)


def test_rapl_counter_unwraps_between_samples(tmp_path):
    set_uj = fake_rapl(tmp_path, {"intel-rapl:0": (0, 1_000)})
    counter = RaplCounter.open(tmp_path)
    for uj in (600, 200, 900, 100):  # two wraps
        set_uj("intel-rapl:0", uj)
        counter.sample()
    assert counter.sample() == pytest.approx((600 + 600 + 700 + 200) / 1e6)


def test_gpu_energy_from_the_nvml_counter(tmp_path):
    nvml = FakeNvml(counter=True)
    synced = []
    with EnergyMeter("cuda:0", rapl_root=tmp_path, nvml=nvml, synchronize=lambda: synced.append(1)) as meter:
        nvml.energy_mj += 36_000  # 36 J
        mid = meter.read()
    assert mid.gpu_wh == pytest.approx(0.01) and mid.gpu_method == "nvml"
    r = meter.reading
    assert r.method == "nvml+estimate" and r.energy_wh == pytest.approx(0.01 + r.cpu_wh)
    assert {"gpu_wh", "gpu_method", "cpu_wh", "cpu_method"} <= set(r.as_metrics())  # each part, with its method
    assert len(synced) >= 3  # at entry, at the read, at exit: the GPU's queue is inside the window


def test_gpu_power_polling_when_the_counter_is_unsupported(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "NVML_POWER_POLL_S", 0.01)
    nvml = FakeNvml(counter=False, power_mw=100_000)  # a steady 100 W
    with EnergyMeter("cuda", rapl_root=tmp_path, nvml=nvml, synchronize=lambda: None) as meter:
        time.sleep(0.3)
    r = meter.reading
    assert r.gpu_method == "nvml-power" and r.method == "nvml-power+estimate"
    assert r.gpu_wh * 3600 == pytest.approx(100 * r.wall_s, rel=0.2)


def test_gpu_estimate_when_nvml_is_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "_import_nvml", lambda: None)
    with EnergyMeter("cuda", gpu_watts=250.0, rapl_root=tmp_path, synchronize=lambda: None) as meter:
        time.sleep(0.05)
    r = meter.reading
    assert r.gpu_method == "estimate" and r.method == "estimate+estimate"
    assert r.gpu_wh == pytest.approx(r.wall_s * 250.0 / 3600)


def test_gpu_estimate_when_nvml_cannot_start(tmp_path):
    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise self.NVMLError("Driver Not Loaded")

    with EnergyMeter("cuda", rapl_root=tmp_path, nvml=NoDriver(), synchronize=lambda: None) as meter:
        pass
    assert meter.reading.gpu_method == "estimate"
