"""Analytic FLOP counts of a GPT-2: the hardware-independent cost that compares CPU and GPU runs.

Counted: every matrix multiply, at 2 FLOPs per multiply-add (the convention of Kaplan et al. 2020
and PaLM's appendix B). Not counted: biases, LayerNorm, softmax, GELU, embeddings lookups and
the optimizer, which are a few percent at most. Attention is counted over the full T×T score
matrix, as dense kernels compute it.

Any linear layer can be given its own forward cost per token, so a crystalline matrix applied in
factored form (two thin matmuls, a block-diagonal product) is charged what it really costs.
"""

from __future__ import annotations

from typing import Mapping

# The four linear layers of each GPT-2 block, named as in transformers' GPT2Block.
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer of a block, for a config with n_embd (and n_inner)."""
    d = config.n_embd
    inner = getattr(config, "n_inner", None) or 4 * d
    return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner), "mlp.c_proj": (inner, d)}


def dense_linear_flops(d_in: int, d_out: int) -> int:
    """Forward FLOPs per token of x @ W with W of shape (d_in, d_out)."""
    return 2 * d_in * d_out


def attention_flops_per_token(n_embd: int, seq_len: int) -> int:
    """QKᵀ and AV of one layer, each 2·T·d per token over the full T×T score matrix."""
    return 4 * seq_len * n_embd


def _per_token(config, seq_len: int, linear_flops: Mapping[tuple[int, str], int] | None):
    shapes = linear_shapes(config)
    overrides = linear_flops or {}
    linears = sum(
        overrides.get((layer, name), dense_linear_flops(*shapes[name]))
        for layer in range(config.n_layer) for name in LINEAR_NAMES
    )
    attention = config.n_layer * attention_flops_per_token(config.n_embd, seq_len)
    head = dense_linear_flops(config.n_embd, config.vocab_size)
    return linears, attention, head


def forward_flops(config, seq_len: int, n_seqs: int = 1,
                  linear_flops: Mapping[tuple[int, str], int] | None = None) -> int:
    """FLOPs of one forward pass over `n_seqs` sequences of `seq_len` tokens.

    `linear_flops` maps (layer index, name in LINEAR_NAMES) to that layer's forward FLOPs per
    token; layers not named are dense.
    """
    linears, attention, head = _per_token(config, seq_len, linear_flops)
    return (linears + attention + head) * seq_len * n_seqs


def backward_flops(config, seq_len: int, n_seqs: int = 1,
                   linear_flops: Mapping[tuple[int, str], int] | None = None,
                   train_linears: bool = True, train_head: bool = True) -> int:
    """FLOPs of the backward pass: each matmul needs the input gradient (1× its forward) and,
    when its weight trains, the weight gradient (another 1×). Frozen matrices still pass
    gradients down, so they cost 1× rather than nothing."""
    linears, attention, head = _per_token(config, seq_len, linear_flops)
    per_token = (2 if train_linears else 1) * linears + 2 * attention + (2 if train_head else 1) * head
    return per_token * seq_len * n_seqs


def train_step_flops(config, seq_len: int, n_seqs: int) -> int:
    """One dense training step (forward + backward, everything trainable): ≈ 6 · params · tokens."""
    return forward_flops(config, seq_len, n_seqs) + backward_flops(config, seq_len, n_seqs)


# Dense bfloat16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name; the first matching entry wins, so specific names come first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200 NVL", 835.0), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0))


def peak_flops(device) -> tuple[float | None, str | None]:
    """The device's dense bf16 peak in FLOP/s and its name, or (None, name) when unknown (every CPU):
    model FLOPs utilisation (MFU) is achieved FLOP/s over this, the convention of PaLM and nanoGPT."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, name
    return None, name


def throughput(flops: int, tokens: int, seconds: float, device) -> dict:
    """Tokens/s, achieved TFLOP/s and MFU (None where the device's peak is unknown)."""
    peak, name = peak_flops(device)
    achieved = flops / seconds if seconds > 0 else 0.0
    return {"tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else 0.0,
            "achieved_tflops": round(achieved / 1e12, 4), "device_name": name,
            "peak_bf16_tflops": None if peak is None else round(peak / 1e12, 1),
            "mfu": None if peak is None else round(achieved / peak, 4)}
