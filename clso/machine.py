"""The machine a run was measured on: what bit-for-bit repeats need."""

import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    """The CPU, cores, torch build and the kernels it picked (and a GPU's name)."""
    cpu, cpuinfo = platform.processor() or platform.machine(), Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux names the model there
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
