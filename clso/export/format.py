"""The .crystal format: its constants, the header and tensor-table layouts, and the packing of
integer codes. The layout is specified in runtime/FORMAT.md; `writer` writes it, `reader` reads it
back with every field validated, and `reference` runs the model it holds in PyTorch.
"""

from __future__ import annotations

import struct

import numpy as np

from clso import ClsoError
from clso.model.library import BUCKETS

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

# The header, field by field in file order: (name, struct code). The struct, the reader's names and
# the writer's order all come from this table; FORMAT.md says what each field means.
HEADER_FIELDS = (
    ("magic", "8s"), ("version", "I"), ("header_bytes", "I"), ("entry_bytes", "I"), ("n_tensors", "I"),
    ("mode", "I"), ("flags", "I"), ("vocab_rows", "I"), ("tokenizer_vocab", "I"), ("n_layer", "I"),
    ("n_embd", "I"), ("n_head", "I"), ("block_size", "I"), ("n_inner", "I"), ("tokenizer_kind", "I"),
    ("eot_token", "I"), ("unk_token", "I"), ("alignment", "I"), ("layer_norm_eps", "f"),
    ("table_offset", "Q"), ("data_offset", "Q"), ("file_bytes", "Q"), ("payload_crc32", "I"),
    ("header_crc32", "I"), ("architecture", "I"),
)
# One entry of the tensor table, the same way: a name, then its dtype, rank, shape, place and scales.
ENTRY_FIELDS = (
    ("name", f"{NAME_BYTES}s"), ("dtype", "I"), ("ndim", "I"), *((f"shape{k}", "I") for k in range(MAX_DIMS)),
    ("offset", "Q"), ("nbytes", "Q"), ("scale", "f"), ("row_scales", "i"),
)


def _layout(fields) -> tuple[struct.Struct, tuple[str, ...]]:
    return struct.Struct("<" + "".join(code for _, code in fields)), tuple(name for name, _ in fields)


HEADER, HEADER_NAMES = _layout(HEADER_FIELDS)
ENTRY, ENTRY_NAMES = _layout(ENTRY_FIELDS)
# where the header's own checksum lies: it is computed with these four bytes zeroed
HEADER_CRC_AT = _layout(HEADER_FIELDS[:HEADER_NAMES.index("header_crc32")])[0].size
assert HEADER.size <= HEADER_BYTES and ENTRY.size <= ENTRY_BYTES


def pack_header(values: dict) -> bytes:
    """The header of `values` (every HEADER_FIELDS name), padded to HEADER_BYTES."""
    return HEADER.pack(*(values[name] for name in HEADER_NAMES)).ljust(HEADER_BYTES, b"\0")


def unpack_header(data: bytes) -> dict:
    return dict(zip(HEADER_NAMES, HEADER.unpack_from(data, 0)))


def pack_entry(values: dict) -> bytes:
    """One tensor-table entry of `values` (every ENTRY_FIELDS name), padded to ENTRY_BYTES."""
    return ENTRY.pack(*(values[name] for name in ENTRY_NAMES)).ljust(ENTRY_BYTES, b"\0")


def unpack_entry(data: bytes, offset: int) -> dict:
    return dict(zip(ENTRY_NAMES, ENTRY.unpack_from(data, offset)))


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



def block_parts(architecture: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The LayerNorms and linear layers (BUCKETS) of one block of the architecture."""
    if architecture == "flat_field":
        return ("ln_2",), tuple(b for b in BUCKETS if b not in ATTENTION_BUCKETS)
    return ("ln_1", "ln_2"), BUCKETS
