"""The compute context every stage sets up the same way: device, CPU threads, derived seeds.
(The C runtime is clso/runtime/, a folder of C source and its format spec.)"""

from __future__ import annotations

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


def setup(base) -> torch.device:
    """Apply the params.yaml `base` section (BaseParams): torch's CPU threads, and the device."""
    if base.threads:
        torch.set_num_threads(base.threads)
    return resolve_device(base.device)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and machines (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
