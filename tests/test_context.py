"""The compute context: thread policy on GPU runs, and the precisions `auto` resolves to."""

from types import SimpleNamespace

import pytest
import torch

from clso import ClsoError
from clso.context import precision_context, resolve_precision, setup


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_a_gpu_run_keeps_one_cpu_thread_unless_told_otherwise(threads, monkeypatch):
    monkeypatch.setattr("clso.context.resolve_device", lambda choice: torch.device("cuda"))
    assert setup(SimpleNamespace(device="cuda", threads=0)).type == "cuda"
    assert torch.get_num_threads() == 1  # idle pool threads would spin, and be charged, while the GPU works
    setup(SimpleNamespace(device="cuda", threads=2))
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    assert setup(SimpleNamespace(device="cuda", threads=0), cpu_only=True).type == "cpu"
    assert torch.get_num_threads() == threads  # a stage that works on the CPU keeps every core


def test_a_cpu_run_keeps_every_core(threads):
    assert setup(SimpleNamespace(device="cpu", threads=0)).type == "cpu"
    assert torch.get_num_threads() == threads


def test_auto_precision_is_fp32_on_a_cpu_and_tf32_needs_cuda():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ClsoError, match="tf32 needs a CUDA GPU"):
        resolve_precision("tf32", "cpu")


def test_bf16_runs_matmuls_in_bfloat16_and_fp32_leaves_them():
    a = torch.randn(4, 4)
    with precision_context("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with precision_context("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_auto_takes_bf16_only_where_tensor_cores_have_it(monkeypatch):
    for capability, expected in (((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", "cuda") == expected
