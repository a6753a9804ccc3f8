"""The model a .crystal file holds, run in PyTorch: the reference the C runtime is tested against."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from clso.export.format import ARCHITECTURES, FLAG_PRUNED, FLAG_TIED, block_parts
from clso.export.reader import Crystal, field_tensors, layer_parts
from clso.field.model import field_op


class CrystalModel:
    """The model a .crystal file holds, run in PyTorch: the reference for the C runtime."""

    def __init__(self, crystal: Crystal):
        self.c, h = crystal, crystal.header
        self.n_head, self.eps = h["n_head"], h["layer_norm_eps"]
        t = lambda name: torch.from_numpy(np.ascontiguousarray(crystal.tensors[name]))  # noqa: E731
        self.wte, self.wpe = t("wte"), t("wpe")
        self.head = self.wte if h["flags"] & FLAG_TIED else t("head")
        self.ln_f = (t("ln_f.w"), t("ln_f.b"))
        self.vocab_ids = crystal.tensors["vocab.ids"] if h["flags"] & FLAG_PRUNED else None
        self.row_of = np.arange(h["tokenizer_vocab"], dtype=np.int64)  # tokenizer id → row of wte, -1 if pruned
        if self.vocab_ids is not None:
            self.row_of[:] = -1
            self.row_of[self.vocab_ids] = np.arange(len(self.vocab_ids))
        self.blocks = []
        architecture = ARCHITECTURES[h["architecture"]]
        lns, buckets = block_parts(architecture)
        for i in range(h["n_layer"]):
            block = {ln: (t(f"h.{i}.{ln}.w"), t(f"h.{i}.{ln}.b")) for ln in lns}
            for bucket in buckets:
                name = f"h.{i}.{bucket}"
                parts = [{k: (None if v is None else torch.from_numpy(np.ascontiguousarray(v)))
                          for k, v in p.items()} for p in layer_parts(crystal, name)]
                gain = float(crystal.tensors[f"{name}.gain"][0]) if crystal.has(f"{name}.gain") else 1.0
                block[bucket] = (parts, gain, t(f"{name}.bias"))
            if architecture != "gpt2":
                block["field"] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in field_tensors(crystal, i).items()}
            self.blocks.append(block)

    @staticmethod
    def _linear(x: torch.Tensor, layer) -> torch.Tensor:
        parts, gain, bias = layer
        y = x.new_zeros(*x.shape[:-1], len(bias))
        for p in parts:
            xin = x if p["in"] is None else x[..., p["in"]]
            out = xin @ p["w"].t() if "w" in p else (xin @ p["u"].t()) @ p["v"].t()
            if p["out"] is None:
                y += out
            else:
                y[..., p["out"]] += out
        return y * gain + bias

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids of the tokenizer → (B, T, tokenizer vocab) logits; pruned ids get -inf."""
        rows = torch.from_numpy(self.row_of[idx.numpy()])
        if (rows < 0).any():
            raise ValueError("a token id that vocabulary pruning removed")
        b, t = idx.shape
        x = self.wte[rows] + self.wpe[:t]
        d = x.shape[-1]
        for blk in self.blocks:
            if "c_attn" in blk:
                qkv = self._linear(F.layer_norm(x, (d,), *blk["ln_1"], self.eps), blk["c_attn"])
                q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in qkv.split(d, -1))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
                x = x + self._linear(a, blk["attn_proj"])
            if "field" in blk:
                f = blk["field"]
                x = x + field_op(F.layer_norm(x, (d,), f["ln.w"], f["ln.b"], self.eps), f["pos"], f["val"], f["temp"])
            m = F.gelu(self._linear(F.layer_norm(x, (d,), *blk["ln_2"], self.eps), blk["c_fc"]), approximate="tanh")
            x = x + self._linear(m, blk["mlp_proj"])
        kept = F.layer_norm(x, (d,), *self.ln_f, self.eps) @ self.head.t()
        if self.vocab_ids is None:
            return kept
        full = kept.new_full((b, t, self.c.header["tokenizer_vocab"]), -math.inf)
        full[..., torch.from_numpy(self.vocab_ids)] = kept
        return full

    __call__ = logits
