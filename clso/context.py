"""The compute context every stage sets up the same way: device, CPU threads, numeric precision,
derived seeds. (The C runtime is clso/export/runtime/, a folder of C source and its format spec.)"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from clso import ClsoError


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ClsoError("base.device is cuda but no CUDA GPU is visible to torch; "
                            "set base.device: auto or cpu, or install a CUDA build of torch")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(base, cpu_only: bool = False) -> torch.device:
    """Apply the params.yaml `base` section (BaseParams): the device, and torch's CPU threads.

    With base.threads 0, a CPU run uses every core; a GPU run keeps one CPU thread: the GPU does
    the work, and idle pool threads spin after each small CPU op, burning energy for nothing (the
    `estimate` method charges their CPU seconds, RAPL their package power). `cpu_only` is for a
    stage that does its work on the CPU whatever base.device says."""
    device = torch.device("cpu") if cpu_only else resolve_device(base.device)
    if base.threads:
        torch.set_num_threads(base.threads)
    elif device.type == "cuda":
        torch.set_num_threads(1)
    return device


def resolve_precision(choice: str, device) -> str:
    """fp32, tf32 or bf16; `auto` is bf16 on a CUDA GPU of compute capability 8.0 or newer and fp32
    elsewhere (on a CPU, bf16 is slow and float32 keeps runs bit for bit deterministic)."""
    device = torch.device(device)
    if choice == "auto":  # bf16 tensor cores from Ampere (8.0) on; older GPUs only emulate it, slowly
        return "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    if choice == "tf32" and device.type != "cuda":
        raise ClsoError("precision tf32 needs a CUDA GPU (TF32 is a tensor-core format); use fp32 or bf16 on a CPU")
    return choice


@contextlib.contextmanager
def precision_context(precision: str, device):
    """Run the enclosed forward passes in `precision`: bf16 as autocast (matmuls in bfloat16,
    reductions and norms in float32), tf32 as TensorFloat-32 matmuls, fp32 as they are."""
    device = torch.device(device)
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    else:
        yield


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes from pinned memory without blocking: a copy from
    pageable memory would wait for every kernel queued before it, so the host could not prepare the
    next piece of work while the GPU runs this one. (PyTorch's caching host allocator keeps the
    pinned block until the copy is done.)"""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and machines (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
