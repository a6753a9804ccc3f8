"""Reading a .crystal file: every field of the header and the tensor table validated, every tensor
decoded to float32 (or int32 indices and raw bytes), and the model it describes checked whole. A
file that is truncated, corrupt, hostile or of another version raises CrystalFormatError.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from clso.export.format import (
    ALIGNMENT,
    ARCHITECTURES,
    DTYPE_NAMES,
    ENTRY_BYTES,
    F32,
    FLAG_CRYSTALLINE,
    FLAG_PRUNED,
    FLAG_TIED,
    HEADER_BYTES,
    HEADER_CRC_AT,
    I4,
    I8,
    I16,
    I32,
    INDEX,
    MAGIC,
    MATRIX_DTYPES,
    MAX_DIMS,
    MAX_PARTS,
    MODES,
    NO_TOKEN,
    READABLE_VERSIONS,
    TRIT5,
    U8,
    VECTOR,
    CrystalFormatError,
    block_parts,
    packed_bytes,
    unpack_entry,
    unpack_header,
    unpack_int4,
    unpack_trits,
)

FIX = "re-create it with `dvc repro -f compile`"


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


def read_crystal(data: bytes, *, verify_checksums: bool = True) -> Crystal:
    """Parse and validate a whole file; any inconsistency raises CrystalFormatError.

    `verify_checksums=False` skips the two CRC-32s, so that a fuzzer reaches the checks behind them.
    """
    h = _read_header(data, verify_checksums)
    entries = _read_table(data, h)
    tensors, dtypes = {}, {}
    for name, (dtype, shape, offset, nbytes, scale, row_scales) in entries:
        tensors[name] = _decode(data, name, dtype, shape, data[offset:offset + nbytes], scale,
                                entries[row_scales] if row_scales != -1 else None)
        dtypes[name] = dtype
    crystal = Crystal(h, tensors, dtypes)
    _check_model(crystal)
    return crystal


def _read_header(data: bytes, verify_checksums: bool) -> dict:
    """The header, checked against the spec, the file's length and (optionally) both checksums."""
    if len(data) < HEADER_BYTES:
        raise CrystalFormatError(f"file of {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header; {FIX}")
    h = unpack_header(data)
    if h["magic"] != MAGIC:
        raise CrystalFormatError("not a .crystal file (bad magic)")
    if h["version"] not in READABLE_VERSIONS:
        raise CrystalFormatError(f"format version {h['version']}, this reader knows {READABLE_VERSIONS}; {FIX}")
    if verify_checksums:
        zeroed = bytearray(data[:HEADER_BYTES])
        zeroed[HEADER_CRC_AT:HEADER_CRC_AT + 4] = b"\0\0\0\0"
        if zlib.crc32(bytes(zeroed)) != h["header_crc32"]:
            raise CrystalFormatError(f"header checksum mismatch (corrupt file); {FIX}")
    if (h["header_bytes"], h["entry_bytes"], h["alignment"]) != (HEADER_BYTES, ENTRY_BYTES, ALIGNMENT):
        raise CrystalFormatError("header, entry or alignment size differs from the spec")
    if h["file_bytes"] != len(data):
        raise CrystalFormatError(f"file is {len(data)} bytes, header says {h['file_bytes']} (truncated?); {FIX}")
    if verify_checksums and zlib.crc32(data[HEADER_BYTES:]) != h["payload_crc32"]:
        raise CrystalFormatError(f"payload checksum mismatch (corrupt file); {FIX}")
    _check_header(h)
    if h["table_offset"] != HEADER_BYTES or h["data_offset"] < HEADER_BYTES + h["n_tensors"] * ENTRY_BYTES \
            or h["data_offset"] > len(data) or h["data_offset"] % ALIGNMENT:
        raise CrystalFormatError("tensor table or data offset out of place")
    return h


def _read_table(data: bytes, h: dict) -> list[tuple[str, tuple]]:
    """Each entry's name and (dtype, shape, offset, nbytes, scale, row_scales), every field checked."""
    n = h["n_tensors"]
    entries, names = [], set()
    for i in range(n):
        e = unpack_entry(data, HEADER_BYTES + i * ENTRY_BYTES)
        name_raw, dtype, ndim = e["name"], e["dtype"], e["ndim"]
        shape_all = [e[f"shape{k}"] for k in range(MAX_DIMS)]
        offset, nbytes, scale, row_scales = e["offset"], e["nbytes"], e["scale"], e["row_scales"]
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
        if nbytes != packed_bytes(dtype, math.prod(shape)) or offset % ALIGNMENT or offset < h["data_offset"] \
                or offset + nbytes > len(data):
            raise CrystalFormatError(f"tensor {name!r}: {nbytes} bytes at {offset} do not fit the file or its shape")
        if not math.isfinite(scale) or (row_scales != -1 and not 0 <= row_scales < n) or row_scales == i:
            raise CrystalFormatError(f"tensor {name!r}: bad scale or row-scale index")
        entries.append((name, (dtype, shape, offset, nbytes, scale, row_scales)))
        names.add(name)
    return entries


def _decode(data: bytes, name: str, dtype: int, shape: tuple, blob: bytes, scale: float, row_scales) -> np.ndarray:
    """One tensor's values: dequantized float32 (row scales and scale applied), int64 indices or bytes."""
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
    if row_scales is not None:
        rs_name, (rs_dtype, rs_shape, rs_offset, rs_nbytes, *_) = row_scales
        if dtype in (I32, U8) or rs_dtype != F32 or rs_shape != (shape[0],):
            raise CrystalFormatError(f"tensor {name!r}: its row scales {rs_name!r} are not f32 of {shape[0]}")
        rs = np.frombuffer(data[rs_offset:rs_offset + rs_nbytes], dtype="<f4")
        values = values * rs.reshape(-1, *[1] * (len(shape) - 1))
    if dtype not in (I32, U8):
        with np.errstate(over="ignore", invalid="ignore"):  # a hostile scale may overflow; not a crash
            values = (values * np.float32(scale)).astype(np.float32)
    return values


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


