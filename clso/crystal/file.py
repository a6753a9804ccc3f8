"""The .crystal file: a GPT-2 (dense or crystalline) quantized for the C runtime.

The layout is specified in clso/crystal/runtime/FORMAT.md; this module writes it, reads it back with
every field validated, and runs the model it holds in PyTorch (the reference the C runtime is
tested against). Every linear layer is a sum of parts, y = bias + gain · Σ_k scatter_out_k(M_k
gather_in_k(x)), with M_k one matrix or a low-rank pair V·U: a dense layer is one full part; a
crystalline layer keeps its library structure (blocks, masks, ternary factors). Its integer values
are packed as integer codes in every mode; its float values (Gaussian blocks, svd factors) follow
the mode like any float matrix. `build_crystal_with_report` says, per file, which values are
stored exactly and which are quantized.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clso import ClsoError
from clso.crystal.library import BUCKETS
from clso.data.tokenizer import EOT, UNK
from clso.field.model import field_op
from clso.model.crystalline import LAYER_NAMES

MAGIC = b"CRYSTAL\0"
VERSION = 2  # written; 2 = 1 + the header's `architecture` and the neuron field op
READABLE_VERSIONS = (1, 2)
# header `architecture`; a version-1 file is gpt2 (the field was reserved zero). flat_field: a field
# without the attention (no ln_1, c_attn, attn_proj)
ARCHITECTURES = ("gpt2", "field", "flat_field")
ATTENTION_BUCKETS = ("c_attn", "attn_proj")
HEADER_BYTES = 256
ENTRY_BYTES = 128
ALIGNMENT = 64
NAME_BYTES = 64
MAX_DIMS = 4
MAX_PARTS = 256
NO_TOKEN = 0xFFFFFFFF
PER_ROW_MIN = 4096  # values a matrix needs before per-row scales (one more tensor) pay for themselves
MIXED_F32 = ("wte", "wpe")  # kept float32 in the mixed modes (the journal's finding); the head is not
EMBEDDINGS = ("wte", "wpe", "head")  # vocabulary-sized tables, reported apart from the body
# How an entry's values relate to the model's: integer codes × scale (bit for bit the library's
# values), float values rounded to int8/int16 codes (and their row scales), float32 as given, or
# int32/byte tables (part indices, vocabulary ids, tokenizer).
STORAGE = ("exact_integer", "quantized_float", "f32", "index")

MODES = ("f32", "int16", "int8", "mixed16", "mixed8")
MODE_CODES = {m: i for i, m in enumerate(MODES)}
FLAG_TIED, FLAG_PRUNED, FLAG_CRYSTALLINE = 1, 2, 4
TOKENIZERS = {"none": 0, "bpe": 1, "char": 2}

F32, I16, I8, I32, TRIT5, I4, U8 = range(7)
DTYPE_NAMES = ("f32", "i16", "i8", "i32", "trit5", "i4", "u8")
MATRIX_DTYPES = (F32, I16, I8, TRIT5, I4)
VECTOR, INDEX = (F32,), (I32,)

# magic, version, header_bytes, entry_bytes, n_tensors, mode, flags, vocab_rows, tokenizer_vocab,
# n_layer, n_embd, n_head, block_size, n_inner, tokenizer_kind, eot_token, unk_token, alignment,
# layer_norm_eps, table_offset, data_offset, file_bytes, payload_crc32, header_crc32, architecture
HEADER = struct.Struct("<8s17If3Q3I")
HEADER_CRC_AT = 108
ENTRY = struct.Struct(f"<{NAME_BYTES}s6IQQfi")
assert HEADER.size <= HEADER_BYTES and ENTRY.size <= ENTRY_BYTES


class CrystalFormatError(ClsoError):
    """A .crystal file that is truncated, corrupt, hostile or of another version."""


# --- packing -----------------------------------------------------------------------------

def packed_bytes(dtype: int, count: int) -> int:
    if dtype == TRIT5:
        return (count + 4) // 5
    if dtype == I4:
        return (count + 1) // 2
    return count * (4 if dtype in (F32, I32) else 2 if dtype == I16 else 1)


def pack_trits(values: np.ndarray) -> bytes:
    """Values in {-1, 0, 1}, five to a byte: Σ_k (v_k + 1)·3^k (a byte holds 0..242)."""
    codes = (values.reshape(-1).astype(np.int64) + 1)
    codes = np.concatenate([codes, np.ones(-len(codes) % 5, dtype=np.int64)]).reshape(-1, 5)
    return (codes @ np.array([1, 3, 9, 27, 81])).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if (raw > 242).any():
        raise CrystalFormatError("a trit5 byte above 242")
    digits = (raw[:, None] // np.array([1, 3, 9, 27, 81])) % 3
    return (digits.reshape(-1)[:count] - 1).astype(np.int8)


def pack_int4(values: np.ndarray) -> bytes:
    """Values in -8..7, two to a byte, the first in the low nibble."""
    v = values.reshape(-1).astype(np.int64) & 0xF
    v = np.concatenate([v, np.zeros(len(v) % 2, dtype=np.int64)]).reshape(-1, 2)
    return (v[:, 0] | (v[:, 1] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


# --- what goes into a file ---------------------------------------------------------------

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


def block_parts(architecture: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The LayerNorms and linear layers (BUCKETS) of one block of the architecture."""
    if architecture == "flat_field":
        return ("ln_2",), tuple(b for b in BUCKETS if b not in ATTENTION_BUCKETS)
    return ("ln_1", "ln_2"), BUCKETS


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
        table += ENTRY.pack(e.name.encode(), e.dtype, len(e.shape), *shape, offset, len(e.data),
                            e.scale, e.row_scales).ljust(ENTRY_BYTES, b"\0")
        padded = e.data.ljust(_align(len(e.data)), b"\0")
        payload += padded
        offset += len(padded)
    body = bytes(table).ljust(data_offset - table_offset, b"\0") + bytes(payload)
    flags = (FLAG_TIED if spec.tied else 0) | (FLAG_PRUNED if pruned else 0) | (FLAG_CRYSTALLINE if spec.crystalline else 0)
    tok_vocab = len(tokenizer.tokens) if tokenizer is not None and tokenizer.kind != "none" else spec.vocab_size
    fields = [MAGIC, VERSION, HEADER_BYTES, ENTRY_BYTES, len(entries), MODE_CODES[mode], flags, vocab_rows,
              max(tok_vocab, spec.vocab_size), spec.n_layer, spec.n_embd, spec.n_head, spec.block_size,
              4 * spec.n_embd, TOKENIZERS[tokenizer.kind if tokenizer else "none"],
              NO_TOKEN if tokenizer is None or tokenizer.eot is None else tokenizer.eot,
              NO_TOKEN if tokenizer is None or tokenizer.unk is None else tokenizer.unk,
              ALIGNMENT, 1e-5, table_offset, data_offset, HEADER_BYTES + len(body), zlib.crc32(body)]
    architecture = ARCHITECTURES.index(spec.architecture)
    header = HEADER.pack(*fields, 0, architecture).ljust(HEADER_BYTES, b"\0")
    header = HEADER.pack(*fields, zlib.crc32(header), architecture).ljust(HEADER_BYTES, b"\0")
    return header + body


# --- reading ------------------------------------------------------------------------------

@dataclass
class Crystal:
    header: dict
    tensors: dict[str, np.ndarray]  # dequantized float32, or int32 for index tensors / uint8 bytes
    dtypes: dict[str, int]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, dtypes=None) -> np.ndarray:
        """The named tensor, checked to have `shape` and one of `dtypes` (default: a matrix type)."""
        if name not in self.tensors:
            raise CrystalFormatError(f"tensor {name!r} is missing")
        t = self.tensors[name]
        if shape is not None and t.shape != shape:
            raise CrystalFormatError(f"tensor {name!r} has shape {t.shape}, expected {shape}")
        if self.dtypes[name] not in (dtypes or MATRIX_DTYPES):
            raise CrystalFormatError(f"tensor {name!r} has dtype {DTYPE_NAMES[self.dtypes[name]]}")
        return t


_HEADER_NAMES = ("magic", "version", "header_bytes", "entry_bytes", "n_tensors", "mode", "flags", "vocab_rows",
                 "tokenizer_vocab", "n_layer", "n_embd", "n_head", "block_size", "n_inner", "tokenizer_kind",
                 "eot_token", "unk_token", "alignment", "layer_norm_eps", "table_offset", "data_offset",
                 "file_bytes", "payload_crc32", "header_crc32", "architecture")


def read_crystal(data: bytes, *, verify_checksums: bool = True) -> Crystal:
    """Parse and validate a whole file; any inconsistency raises CrystalFormatError.

    `verify_checksums=False` skips the two CRC-32s, so that a fuzzer reaches the checks behind them.
    """
    fix = "re-create it with `dvc repro -f compile`"
    if len(data) < HEADER_BYTES:
        raise CrystalFormatError(f"file of {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header; {fix}")
    h = dict(zip(_HEADER_NAMES, HEADER.unpack_from(data, 0)))
    if h["magic"] != MAGIC:
        raise CrystalFormatError("not a .crystal file (bad magic)")
    if h["version"] not in READABLE_VERSIONS:
        raise CrystalFormatError(f"format version {h['version']}, this reader knows {READABLE_VERSIONS}; {fix}")
    if verify_checksums:
        zeroed = bytearray(data[:HEADER_BYTES])
        zeroed[HEADER_CRC_AT:HEADER_CRC_AT + 4] = b"\0\0\0\0"
        if zlib.crc32(bytes(zeroed)) != h["header_crc32"]:
            raise CrystalFormatError(f"header checksum mismatch (corrupt file); {fix}")
    if (h["header_bytes"], h["entry_bytes"], h["alignment"]) != (HEADER_BYTES, ENTRY_BYTES, ALIGNMENT):
        raise CrystalFormatError("header, entry or alignment size differs from the spec")
    if h["file_bytes"] != len(data):
        raise CrystalFormatError(f"file is {len(data)} bytes, header says {h['file_bytes']} (truncated?); {fix}")
    if verify_checksums and zlib.crc32(data[HEADER_BYTES:]) != h["payload_crc32"]:
        raise CrystalFormatError(f"payload checksum mismatch (corrupt file); {fix}")
    _check_header(h)
    n = h["n_tensors"]
    if h["table_offset"] != HEADER_BYTES or h["data_offset"] < HEADER_BYTES + n * ENTRY_BYTES \
            or h["data_offset"] > len(data) or h["data_offset"] % ALIGNMENT:
        raise CrystalFormatError("tensor table or data offset out of place")
    tensors, dtypes, entries, names = {}, {}, [], set()
    for i in range(n):
        raw = ENTRY.unpack_from(data, HEADER_BYTES + i * ENTRY_BYTES)
        name_raw, dtype, ndim, *rest = raw
        shape_all, offset, nbytes, scale, row_scales = rest[:4], rest[4], rest[5], rest[6], rest[7]
        if b"\0" not in name_raw:
            raise CrystalFormatError(f"tensor {i}: name not terminated")
        name_bytes = name_raw.split(b"\0", 1)[0]
        if any(b < 0x20 or b > 0x7E for b in name_bytes):
            raise CrystalFormatError(f"tensor {i}: name is not printable ASCII")
        name = name_bytes.decode("ascii")
        if not name or name in names:
            raise CrystalFormatError(f"tensor {i}: empty or repeated name {name!r}")
        if dtype >= len(DTYPE_NAMES) or not 1 <= ndim <= MAX_DIMS:
            raise CrystalFormatError(f"tensor {name!r}: unknown dtype {dtype} or rank {ndim}")
        shape = tuple(shape_all[:ndim])
        if any(s == 0 for s in shape) or any(s != 0 for s in shape_all[ndim:]) or math.prod(shape) > len(data) * 5:
            raise CrystalFormatError(f"tensor {name!r}: bad shape {shape_all}")
        count = math.prod(shape)
        if nbytes != packed_bytes(dtype, count) or offset % ALIGNMENT or offset < h["data_offset"] \
                or offset + nbytes > len(data):
            raise CrystalFormatError(f"tensor {name!r}: {nbytes} bytes at {offset} do not fit the file or its shape")
        if not math.isfinite(scale) or (row_scales != -1 and not 0 <= row_scales < n) or row_scales == i:
            raise CrystalFormatError(f"tensor {name!r}: bad scale or row-scale index")
        entries.append((name, (dtype, shape, offset, nbytes, scale, row_scales)))
        names.add(name)
    for i, (name, (dtype, shape, offset, nbytes, scale, row_scales)) in enumerate(entries):
        blob = data[offset:offset + nbytes]
        count = math.prod(shape)
        if dtype == F32:
            values = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            if not np.isfinite(values).all():
                raise CrystalFormatError(f"tensor {name!r} holds non-finite values")
        elif dtype == I16:
            values = np.frombuffer(blob, dtype="<i2").astype(np.float32)
        elif dtype == I8:
            values = np.frombuffer(blob, dtype=np.int8).astype(np.float32)
        elif dtype == TRIT5:
            values = unpack_trits(blob, count).astype(np.float32)
        elif dtype == I4:
            values = unpack_int4(blob, count).astype(np.float32)
        elif dtype == I32:
            values = np.frombuffer(blob, dtype="<i4").astype(np.int64)
        else:
            values = np.frombuffer(blob, dtype=np.uint8).copy()
        values = values.reshape(shape)
        if row_scales != -1:
            rs_name, (rs_dtype, rs_shape, rs_offset, rs_nbytes, *_) = entries[row_scales]
            if dtype in (I32, U8) or rs_dtype != F32 or rs_shape != (shape[0],):
                raise CrystalFormatError(f"tensor {name!r}: its row scales {rs_name!r} are not f32 of {shape[0]}")
            rs = np.frombuffer(data[rs_offset:rs_offset + rs_nbytes], dtype="<f4")
            values = values * rs.reshape(-1, *[1] * (len(shape) - 1))
        if dtype not in (I32, U8):
            with np.errstate(over="ignore", invalid="ignore"):  # a hostile scale may overflow; not a crash
                values = (values * np.float32(scale)).astype(np.float32)
        tensors[name] = values
        dtypes[name] = dtype
    crystal = Crystal(h, tensors, dtypes)
    _check_model(crystal)
    return crystal


def _check_header(h: dict) -> None:
    if h["architecture"] >= len(ARCHITECTURES) or (h["version"] == 1 and h["architecture"]):
        raise CrystalFormatError(f"unknown architecture {h['architecture']} for format version {h['version']}")
    if h["mode"] >= len(MODES) or h["flags"] & ~(FLAG_TIED | FLAG_PRUNED | FLAG_CRYSTALLINE):
        raise CrystalFormatError(f"unknown mode {h['mode']} or flags {h['flags']:#x}")
    limits = {"n_layer": 256, "n_embd": 65536, "n_head": 1024, "block_size": 1 << 20, "vocab_rows": 1 << 24,
              "tokenizer_vocab": 1 << 24, "n_tensors": 1 << 20}
    for key, top in limits.items():
        if not 1 <= h[key] <= top:
            raise CrystalFormatError(f"header {key} = {h[key]} outside 1..{top}")
    if h["n_embd"] % h["n_head"] or h["n_inner"] != 4 * h["n_embd"] or h["vocab_rows"] > h["tokenizer_vocab"]:
        raise CrystalFormatError("header n_embd/n_head/n_inner/vocab sizes disagree")
    if h["tokenizer_kind"] > 2 or not (math.isfinite(h["layer_norm_eps"]) and 0 < h["layer_norm_eps"] < 1):
        raise CrystalFormatError("header tokenizer kind or layer-norm epsilon out of range")
    for key in ("eot_token", "unk_token"):
        if h[key] != NO_TOKEN and h[key] >= h["tokenizer_vocab"]:
            raise CrystalFormatError(f"header {key} outside the vocabulary")


def _check_model(c: Crystal) -> None:
    """Every tensor the forward pass reads exists with the right shape; indices lie in range."""
    h = c.header
    d, v, inner = h["n_embd"], h["vocab_rows"], h["n_inner"]
    c.tensor("wte", (v, d))
    c.tensor("wpe", (h["block_size"], d))
    for name in ("ln_f.w", "ln_f.b"):
        c.tensor(name, (d,), VECTOR)
    if not h["flags"] & FLAG_TIED:
        c.tensor("head", (v, d))
    if h["flags"] & FLAG_PRUNED:
        ids = c.tensor("vocab.ids", (v,), INDEX)
        if (ids < 0).any() or (ids >= h["tokenizer_vocab"]).any() or (np.diff(ids) <= 0).any():
            raise CrystalFormatError("vocab.ids must be sorted, distinct ids of the tokenizer")
    elif v != h["tokenizer_vocab"]:
        raise CrystalFormatError("an unpruned file must keep the whole vocabulary")
    shapes = {"c_attn": (d, 3 * d), "attn_proj": (d, d), "c_fc": (d, inner), "mlp_proj": (inner, d)}
    architecture = ARCHITECTURES[h["architecture"]]
    lns, buckets = block_parts(architecture)
    for i in range(h["n_layer"]):
        for ln in lns:
            c.tensor(f"h.{i}.{ln}.w", (d,), VECTOR)
            c.tensor(f"h.{i}.{ln}.b", (d,), VECTOR)
        for bucket in buckets:
            d_in, d_out = shapes[bucket]
            name = f"h.{i}.{bucket}"
            c.tensor(f"{name}.bias", (d_out,), VECTOR)
            if c.has(f"{name}.gain"):
                c.tensor(f"{name}.gain", (1,), VECTOR)
            parts = layer_parts(c, name)
            if not parts:
                raise CrystalFormatError(f"layer {name} has no parts")
            for p in parts:
                k_in = d_in if p["in"] is None else len(p["in"])
                k_out = d_out if p["out"] is None else len(p["out"])
                for side, idx, bound in (("in", p["in"], d_in), ("out", p["out"], d_out)):
                    if idx is not None and (idx.ndim != 1 or len(idx) > bound or (idx < 0).any() or (idx >= bound).any()):
                        raise CrystalFormatError(f"layer {name}: {side} indices outside 0..{bound - 1}")
                if "w" in p:
                    ok = p["w"].shape == (k_out, k_in)
                else:
                    ok = p["u"].ndim == 2 and p["v"].ndim == 2 and p["u"].shape[1] == k_in \
                        and p["v"].shape == (k_out, p["u"].shape[0])
                if not ok:
                    raise CrystalFormatError(f"layer {name}: part matrices do not fit {k_in}→{k_out}")
        if architecture != "gpt2":
            field_tensors(c, i)
    tok = h["tokenizer_kind"]
    if tok:
        offsets = c.tensor("tok.offsets", (h["tokenizer_vocab"] + 1,), INDEX)
        blob = c.tensor("tok.bytes", None, (U8,)) if c.has("tok.bytes") else np.zeros(0, np.uint8)
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(blob):
            raise CrystalFormatError("tok.offsets do not index tok.bytes")
        if c.has("tok.merges"):
            m = c.tensor("tok.merges", None, INDEX)
            if m.ndim != 2 or m.shape[1] != 3 or (m < 0).any() or (m >= h["tokenizer_vocab"]).any():
                raise CrystalFormatError("tok.merges must be (n, 3) token ids")


def field_tensors(c: Crystal, layer: int) -> dict[str, np.ndarray]:
    """Block `layer`'s neuron field, checked: its LayerNorm, N positions and values (N × n_embd) and
    N temperatures."""
    d, f = c.header["n_embd"], f"h.{layer}.field"
    positions = c.tensor(f"{f}.pos")
    n = positions.shape[0]
    if positions.shape != (n, d):
        raise CrystalFormatError(f"field {f}: positions of shape {positions.shape}, expected (neurons, {d})")
    return {"ln.w": c.tensor(f"{f}.ln.w", (d,), VECTOR), "ln.b": c.tensor(f"{f}.ln.b", (d,), VECTOR), "pos": positions,
            "val": c.tensor(f"{f}.val", (n, d)), "temp": c.tensor(f"{f}.temp", (n,), VECTOR)}


def layer_parts(c: Crystal, name: str) -> list[dict]:
    parts = []
    for k in range(MAX_PARTS + 1):
        p = f"{name}.p{k}"
        if not (c.has(f"{p}.w") or c.has(f"{p}.u")):
            break
        if k == MAX_PARTS:
            raise CrystalFormatError(f"layer {name} has more than {MAX_PARTS} parts")
        part = {side: c.tensor(f"{p}.{side}", None, INDEX) if c.has(f"{p}.{side}") else None for side in ("in", "out")}
        if c.has(f"{p}.w"):
            part["w"] = c.tensor(f"{p}.w")
        else:
            part["u"], part["v"] = c.tensor(f"{p}.u"), c.tensor(f"{p}.v")
        parts.append(part)
    return parts


# --- running it in PyTorch ----------------------------------------------------------------

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
