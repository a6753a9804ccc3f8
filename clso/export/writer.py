"""Writing a .crystal file: a GPT-2 (dense, crystalline or with neuron fields) quantized for the C
runtime.

Every linear layer is a sum of parts, y = bias + gain · Σ_k scatter_out_k(M_k gather_in_k(x)), with
M_k one matrix or a low-rank pair V·U: a dense layer is one full part; a crystalline layer keeps its
library structure (blocks, masks, ternary factors). Its integer values are packed as integer codes in
every mode; its float values (Gaussian blocks, svd factors) follow the mode like any float matrix.
`build_crystal_with_report` says, per file, which values are stored exactly and which are quantized.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from clso.data.tokenizer import EOT, UNK
from clso.export.format import (
    ALIGNMENT,
    ARCHITECTURES,
    DTYPE_NAMES,
    EMBEDDINGS,
    ENTRY_BYTES,
    F32,
    FLAG_CRYSTALLINE,
    FLAG_PRUNED,
    FLAG_TIED,
    HEADER_BYTES,
    I4,
    I8,
    I16,
    I32,
    MAGIC,
    MAX_DIMS,
    MIXED_F32,
    MODE_CODES,
    MODES,
    NAME_BYTES,
    NO_TOKEN,
    PER_ROW_MIN,
    STORAGE,
    TOKENIZERS,
    TRIT5,
    U8,
    VERSION,
    block_parts,
    pack_entry,
    pack_header,
    pack_int4,
    pack_trits,
    packed_bytes,
)
from clso.model.crystalline import LAYER_NAMES
from clso.model.library import BUCKETS


@dataclass
class Entry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes
    scale: float = 1.0
    row_scales: int = -1  # index of an f32 tensor of shape[0] scales, or -1
    storage: str = "index"  # one of STORAGE; not written to the file


class _Writer:
    def __init__(self, mode: str):
        self.mode, self.entries = mode, []
        self.crystalline_layers: list[list[Entry]] = []  # the entries of each crystalline layer's parts

    def add(self, name: str, dtype: int, shape, data: bytes, scale=1.0, row_scales=-1, storage="index") -> None:
        if len(name.encode()) >= NAME_BYTES:
            raise ValueError(f"tensor name {name!r} too long")
        self.entries.append(Entry(name, dtype, tuple(int(s) for s in shape), data, float(scale), row_scales, storage))

    def exact(self, name: str, values: torch.Tensor, scale: float = 1.0) -> None:
        """Integer values, packed as tightly as their range allows (lossless in every mode)."""
        v = values.detach().cpu().numpy().astype(np.int64)
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        if lo >= -1 and hi <= 1:
            self.add(name, TRIT5, v.shape, pack_trits(v), scale, storage="exact_integer")
        elif lo >= -8 and hi <= 7:
            self.add(name, I4, v.shape, pack_int4(v), scale, storage="exact_integer")
        elif lo >= -128 and hi <= 127:
            self.add(name, I8, v.shape, v.astype(np.int8).tobytes(), scale, storage="exact_integer")
        else:
            raise ValueError(f"{name}: integer values {lo}..{hi} do not fit int8")

    def floats(self, name: str, values: torch.Tensor) -> None:
        """Float values: vectors stay f32; matrices follow the mode (MIXED_F32 stay f32 in mixed modes)."""
        w = values.detach().float().cpu().numpy()
        bits = {"int16": 16, "int8": 8, "mixed16": 16, "mixed8": 8}.get(self.mode)
        if w.ndim < 2 or bits is None or (name in MIXED_F32 and self.mode.startswith("mixed")):
            self.add(name, F32, w.shape, np.ascontiguousarray(w, dtype="<f4").tobytes(), storage="f32")
            return
        top, dtype, np_type = (2 ** (bits - 1) - 1), (I16 if bits == 16 else I8), ("<i2" if bits == 16 else "i1")
        if self.mode.startswith("mixed") and w.size >= PER_ROW_MIN:  # rows (outputs) differ in range
            absmax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
            scales = np.where(absmax > 0, absmax / top, 1.0).astype(np.float32)
            q = np.round(w / scales.reshape(-1, *[1] * (w.ndim - 1)))
            self.add(f"{name}.scales", F32, scales.shape, scales.astype("<f4").tobytes(), storage="quantized_float")
            self.add(name, dtype, w.shape, q.astype(np_type).tobytes(), 1.0, len(self.entries) - 1, "quantized_float")
        else:  # per tensor, like the journal's
            absmax = float(np.abs(w).max()) if w.size else 0.0
            scale = absmax / top if absmax > 0 else 1.0
            self.add(name, dtype, w.shape, np.round(w / scale).astype(np_type).tobytes(), scale,
                     storage="quantized_float")

    def report(self, file_bytes: int) -> dict:
        """Values and bytes by STORAGE kind, the EMBEDDINGS apart (`overhead_bytes`: header, table,
        alignment padding). A crystalline layer is exact when none of its parts is quantized: each
        factor read back is bit for bit the library's stored tensor (× the library scale, in
        float32, for the factor that carries it). Integer codes always are, float factors only in
        f32 files. `float_matrix_values_outside_embeddings`: the body's non-integer matrix values
        (dense layers, float library factors), quantized or not."""
        row_scales = {e.row_scales for e in self.entries}
        body = {k: {"values": 0, "bytes": 0} for k in STORAGE}
        embeddings = {k: {"values": 0, "bytes": 0} for k in ("quantized_float", "f32")}
        floats = 0
        for i, e in enumerate(self.entries):
            values = 0 if i in row_scales else math.prod(e.shape)  # row scales are bytes, not values
            embedding = e.name.split(".")[0] in EMBEDDINGS
            group = (embeddings if embedding else body)[e.storage]
            group["values"] += values
            group["bytes"] += len(e.data)
            if not embedding and len(e.shape) > 1 and e.storage in ("quantized_float", "f32"):
                floats += values
        stored = sum(g["bytes"] for groups in (body, embeddings) for g in groups.values())
        embedding_bytes = sum(g["bytes"] for g in embeddings.values())
        exact = sum(all(e.storage != "quantized_float" for e in layer) for layer in self.crystalline_layers)
        return {"storage": {**body, "embeddings": embeddings, "overhead_bytes": file_bytes - stored},
                "exactness": {"crystalline_layers": len(self.crystalline_layers), "exact_layers": exact,
                              "float_matrix_values_outside_embeddings": floats,
                              "embedding_share_of_bytes": embedding_bytes / file_bytes}}


def _add_crystal_layer(writer: _Writer, prefix: str, kind: str, stored: dict[str, torch.Tensor]) -> None:
    """A library matrix as parts in (out × in) orientation, scale kept apart: integer values as
    integer codes in every mode, float values (Gaussian blocks, svd factors) as floats of the mode."""
    scale = float(stored["scale"][0])

    def values(name, t, s=1.0):
        if t.dtype == torch.float32:
            writer.floats(name, t * s)
        else:
            writer.exact(name, t, s)

    if kind == "lowrank":  # x @ U @ V: u = Uᵀ (r × d_in), v = Vᵀ (d_out × r)
        values(f"{prefix}.p0.u", stored["U"].t().contiguous())
        values(f"{prefix}.p0.v", stored["V"].t().contiguous(), scale)
        return
    if kind == "dense":
        values(f"{prefix}.p0.w", stored["W"].t().contiguous(), scale)
        return
    k = 0
    while f"in{k}" in stored:
        p = f"{prefix}.p{k}"
        for side in ("in", "out"):
            idx = stored[f"{side}{k}"].to(torch.int32).numpy().astype("<i4")
            writer.add(f"{p}.{side}", I32, idx.shape, idx.tobytes())
        if f"B{k}" in stored:
            values(f"{p}.w", stored[f"B{k}"].t().contiguous(), scale)
        elif f"B{k}_u" in stored:
            values(f"{p}.u", stored[f"B{k}_u"].t().contiguous())
            values(f"{p}.v", stored[f"B{k}_v"].t().contiguous(), scale)
        else:
            values(f"{p}.w", stored[f"S{k}"].t().contiguous(), scale)
        k += 1


@dataclass(frozen=True)
class ModelSpec:
    """What the writer needs of a model, dense or crystalline."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    tied: bool
    state: dict[str, torch.Tensor]  # GPT-2 continuous parameters by their transformers names
    layers: dict[str, tuple[str, dict[str, torch.Tensor]] | torch.Tensor]  # "h.0.c_attn" → (kind, stored) or dense Conv1D weight
    gains: dict[str, float]
    crystalline: bool
    # the neuron field of each block (architecture `field`): "h.L" → {"ln.w", "ln.b", "pos", "val", "temp"}
    fields: dict[str, dict[str, torch.Tensor]] | None = None
    attention: bool = True  # False: a flat field's blocks (no ln_1, c_attn, attn_proj)

    @property
    def architecture(self) -> str:
        return "gpt2" if self.fields is None else "field" if self.attention else "flat_field"




def dense_spec(model, config) -> ModelSpec:
    """A stock GPT2LMHeadModel (the baseline)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    layers = {f"h.{i}.{b}": state[f"transformer.h.{i}.{m}.weight"]
              for i in range(config.n_layer) for b, m in LAYER_NAMES.items()}
    return ModelSpec(config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size,
                     config.tie_embeddings, state, layers, {}, False)


def crystalline_spec(model, stored_library: dict[str, torch.Tensor], manifest: dict) -> ModelSpec:
    """A CrystallineGPT2 with its genome set; `stored_library` is library.safetensors as saved."""
    config = model.config
    state = {k: v.detach().float().cpu() for k, v in model.gpt2.state_dict().items()}
    layers, gains = {}, {}
    for k, (layer, gene) in enumerate(zip(model.layers, model.genome)):
        name = f"h.{k // len(BUCKETS)}.{layer.bucket}"
        prefix = f"{layer.bucket}.{gene}."
        kind = manifest["buckets"][layer.bucket]["matrices"][gene]["kind"]
        layers[name] = (kind, {key[len(prefix):]: t for key, t in stored_library.items() if key.startswith(prefix)})
        gains[name] = float(layer.gain)
    return ModelSpec(config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size,
                     config.tie_embeddings, state, layers, gains, True)


def field_spec(model) -> ModelSpec:
    """A clso.field FieldLM: GPT-2's tensors by their transformers names, and each block's field
    (its born neurons; a field with none is written as one neuron of zero value, the same function)."""
    config = model.config
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    layers, fields = {}, {}
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}"
        linears = {"c_fc": block.c_fc, "mlp_proj": block.mlp_proj}
        lns = ["ln_2"]
        if block.attn is not None:
            linears |= {"c_attn": block.attn.c_attn, "attn_proj": block.attn.c_proj}
            lns.append("ln_1")
        for bucket, linear in linears.items():
            state[f"{h}.{LAYER_NAMES[bucket]}.bias"] = linear.bias
            layers[f"h.{i}.{bucket}"] = linear.weight.t()  # Conv1D orientation, as dense_spec's
        for ln in lns:
            state[f"{h}.{ln}.weight"], state[f"{h}.{ln}.bias"] = getattr(block, ln).weight, getattr(block, ln).bias
        f, n = block.field, max(block.field.alive, 1)
        fields[f"h.{i}"] = {"ln.w": block.ln_field.weight, "ln.b": block.ln_field.bias, "pos": f.positions[:n],
                            "val": f.values[:n] if f.alive else torch.zeros_like(f.values[:1]),
                            "temp": f.temperatures[:n]}
    detach = lambda t: t.detach().float().cpu()  # noqa: E731
    return ModelSpec(config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size, True,
                     {k: detach(v) for k, v in state.items()}, {k: detach(v) for k, v in layers.items()}, {}, False,
                     {k: {name: detach(t) for name, t in f.items()} for k, f in fields.items()}, config.attention)


@dataclass(frozen=True)
class TokenizerExport:
    """A tokenizer as the C runtime reads it: raw bytes per token, BPE merges as id triples."""

    kind: str  # "none" | "bpe" | "char"
    tokens: list[bytes]
    merges: list[tuple[int, int, int]]
    eot: int | None
    unk: int | None


def export_tokenizer(tokenizer) -> TokenizerExport:
    """From a `tokenizers` Tokenizer built by clso.data.tokenizer (byte-level BPE or characters)."""
    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [b""] * (max(vocab.values()) + 1)
    special = {t["content"] for t in spec.get("added_tokens", [])}
    model = spec["model"]
    if model["type"] == "BPE":
        decode = {c: b for b, c in _bytes_to_unicode().items()}
        for text, i in vocab.items():
            tokens[i] = text.encode() if text in special else bytes(decode[c] for c in text)
        merges = []
        for m in model["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            merges.append((vocab[a], vocab[b], vocab[a + b]))
        kind = "bpe"
    else:
        for text, i in vocab.items():
            tokens[i] = text.encode()
        merges, kind = [], "char"
    return TokenizerExport(kind, tokens, merges, vocab.get(EOT), vocab.get(UNK))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (used by byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def build_crystal(spec: ModelSpec, mode: str, tokenizer: TokenizerExport | None = None,
                  keep_tokens: np.ndarray | None = None) -> bytes:
    """The bytes of a .crystal file. `keep_tokens` (sorted ids) prunes the vocabulary to them."""
    return build_crystal_with_report(spec, mode, tokenizer, keep_tokens)[0]


def build_crystal_with_report(spec: ModelSpec, mode: str, tokenizer: TokenizerExport | None = None,
                              keep_tokens: np.ndarray | None = None) -> tuple[bytes, dict]:
    """The bytes of a .crystal file and how they store the model's values (`_Writer.report`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    w = _Writer(mode)
    s = spec.state
    wte = s["transformer.wte.weight"]
    head = s.get("lm_head.weight", wte) if not spec.tied else None
    if keep_tokens is not None:
        keep_tokens = np.asarray(keep_tokens, dtype=np.int64)
        if not (np.all(np.diff(keep_tokens) > 0) and keep_tokens[0] >= 0 and keep_tokens[-1] < spec.vocab_size):
            raise ValueError("keep_tokens must be sorted, distinct ids of the vocabulary")
        index = torch.from_numpy(keep_tokens)
        wte = wte[index]
        head = None if head is None else head[index]
        w.add("vocab.ids", I32, keep_tokens.shape, keep_tokens.astype("<i4").tobytes())
    w.floats("wte", wte)
    w.floats("wpe", s["transformer.wpe.weight"])
    lns, buckets = block_parts(spec.architecture)
    for i in range(spec.n_layer):
        h = f"transformer.h.{i}"
        for ln in lns:
            w.floats(f"h.{i}.{ln}.w", s[f"{h}.{ln}.weight"])
            w.floats(f"h.{i}.{ln}.b", s[f"{h}.{ln}.bias"])
        for bucket in buckets:
            name = f"h.{i}.{bucket}"
            w.floats(f"{name}.bias", s[f"{h}.{LAYER_NAMES[bucket]}.bias"])
            layer = spec.layers[name]
            if isinstance(layer, torch.Tensor):  # Conv1D weight (d_in × d_out)
                w.floats(f"{name}.p0.w", layer.t().contiguous())
            else:
                first = len(w.entries)
                _add_crystal_layer(w, name, *layer)
                w.crystalline_layers.append(w.entries[first:])
            if name in spec.gains:
                w.floats(f"{name}.gain", torch.tensor([spec.gains[name]]))
        if spec.fields is not None:
            for key, t in spec.fields[f"h.{i}"].items():
                w.floats(f"h.{i}.field.{key}", t)
    w.floats("ln_f.w", s["transformer.ln_f.weight"])
    w.floats("ln_f.b", s["transformer.ln_f.bias"])
    if head is not None:
        w.floats("head", head)
    if tokenizer is not None and tokenizer.kind != "none":
        offsets = np.cumsum([0] + [len(t) for t in tokenizer.tokens]).astype("<i4")
        w.add("tok.bytes", U8, (int(offsets[-1]),), b"".join(tokenizer.tokens))
        w.add("tok.offsets", I32, offsets.shape, offsets.tobytes())
        if tokenizer.merges:
            merges = np.asarray(tokenizer.merges, dtype="<i4")
            w.add("tok.merges", I32, merges.shape, merges.tobytes())
    blob = _serialise(spec, mode, w.entries, tokenizer, keep_tokens is not None, len(wte))
    return blob, w.report(len(blob))


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _serialise(spec: ModelSpec, mode: str, entries: list[Entry], tokenizer, pruned: bool, vocab_rows: int) -> bytes:
    table_offset = HEADER_BYTES
    data_offset = _align(table_offset + ENTRY_BYTES * len(entries))
    table, payload, offset = bytearray(), bytearray(), data_offset
    for e in entries:
        if len(e.data) != packed_bytes(e.dtype, math.prod(e.shape)):
            raise AssertionError(f"{e.name}: {len(e.data)} bytes for {DTYPE_NAMES[e.dtype]} {e.shape}")
        shape = list(e.shape) + [0] * (MAX_DIMS - len(e.shape))
        table += pack_entry({"name": e.name.encode(), "dtype": e.dtype, "ndim": len(e.shape),
                             **{f"shape{k}": s for k, s in enumerate(shape)}, "offset": offset,
                             "nbytes": len(e.data), "scale": e.scale, "row_scales": e.row_scales})
        padded = e.data.ljust(_align(len(e.data)), b"\0")
        payload += padded
        offset += len(padded)
    body = bytes(table).ljust(data_offset - table_offset, b"\0") + bytes(payload)
    flags = (FLAG_TIED if spec.tied else 0) | (FLAG_PRUNED if pruned else 0) | (FLAG_CRYSTALLINE if spec.crystalline else 0)
    tok_vocab = len(tokenizer.tokens) if tokenizer is not None and tokenizer.kind != "none" else spec.vocab_size
    header = {
        "magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "entry_bytes": ENTRY_BYTES,
        "n_tensors": len(entries), "mode": MODE_CODES[mode], "flags": flags, "vocab_rows": vocab_rows,
        "tokenizer_vocab": max(tok_vocab, spec.vocab_size), "n_layer": spec.n_layer, "n_embd": spec.n_embd,
        "n_head": spec.n_head, "block_size": spec.block_size, "n_inner": 4 * spec.n_embd,
        "tokenizer_kind": TOKENIZERS[tokenizer.kind if tokenizer else "none"],
        "eot_token": NO_TOKEN if tokenizer is None or tokenizer.eot is None else tokenizer.eot,
        "unk_token": NO_TOKEN if tokenizer is None or tokenizer.unk is None else tokenizer.unk,
        "alignment": ALIGNMENT, "layer_norm_eps": 1e-5, "table_offset": table_offset, "data_offset": data_offset,
        "file_bytes": HEADER_BYTES + len(body), "payload_crc32": zlib.crc32(body), "header_crc32": 0,
        "architecture": ARCHITECTURES.index(spec.architecture),
    }
    header["header_crc32"] = zlib.crc32(pack_header(header))  # of the header with its own checksum zeroed
    return pack_header(header) + body
