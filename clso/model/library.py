"""The basis library: M "crystalline" matrices for each weight shape of a GPT-2, kept factored.

A matrix W (d_in × d_out, applied as y = x @ W like GPT-2's Conv1D) is one of

    lowrank   W = U @ V           U: d_in × r, V: r × d_out (ternary or 5-level, times a scale)
    blocks    W[in_k, out_k] = B_k for disjoint index sets: block-diagonal, row and column
              masks and checkerboards are all this, applied as a few small matmuls
    dense     W itself (random ±C masks, dense ternary/int4 controls)

Every matrix is a pure function of (library seed, bucket, index) and is scaled so that
‖W‖²_F = d_out: a unit-variance input gives unit-variance outputs on average.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from clso import ClsoError
from clso.context import generator
from clso.io import write_bytes_atomic, write_json_atomic

# The targeted layers of one GPT-2 block, in genome order: gene 4·layer + j is BUCKETS[j].
BUCKETS = ("c_attn", "attn_proj", "c_fc", "mlp_proj")
FAMILIES = ("block_diag", "ternary_lowrank", "structured_sparse", "dense_quantized", "svd")
LIBRARY_VERSION = 1
SANITY_MAX_ERROR = 0.2  # the protocol's step 1: a library that cannot get this close is too weak


def bucket_shapes(n_embd: int, n_inner: int | None = None) -> dict[str, tuple[int, int]]:
    inner = n_inner or 4 * n_embd
    return {"c_attn": (n_embd, 3 * n_embd), "attn_proj": (n_embd, n_embd),
            "c_fc": (n_embd, inner), "mlp_proj": (inner, n_embd)}


@dataclass
class CrystalMatrix:
    """A library matrix in the form it is applied (float32 tensors, scale folded in)."""

    d_in: int
    d_out: int
    kind: str  # "lowrank" | "blocks" | "dense"
    tensors: dict[str, torch.Tensor]
    blocks: list[tuple[torch.Tensor | slice, torch.Tensor | slice, torch.Tensor]] = field(default_factory=list)

    def apply(self, x: torch.Tensor, gain: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """gain · (x @ W) + bias over the last dimension, in factored form.

        The gain scales the small last factor and the bias rides on the final matmul, so no
        extra pass over the (large) output is made.
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in)
        scaled = (lambda t: t) if gain is None else (lambda t: t * gain)  # noqa: E731
        if self.kind in ("lowrank", "dense"):
            left, last = (x @ self.tensors["U"], self.tensors["V"]) if self.kind == "lowrank" else (x, self.tensors["W"])
            y = torch.addmm(bias, left, scaled(last)) if bias is not None else left @ scaled(last)
        elif self._concat:
            y = torch.cat([x[:, i] @ scaled(b) for i, _, b in self.blocks], dim=1)
            if bias is not None:
                y += bias
        else:
            # under autocast the blocks' products come out in its dtype: gather them in that dtype
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            y = (bias.expand(len(x), -1).to(dtype).clone() if bias is not None
                 else x.new_zeros(len(x), self.d_out, dtype=dtype))
            for i, o, b in self.blocks:
                part = _take(x, i) @ scaled(b)
                if isinstance(o, slice):
                    y[:, o] += part
                else:
                    y.index_add_(1, o, part)
        return y.view(*lead, self.d_out)

    def dense(self) -> torch.Tensor:
        if self.kind == "lowrank":
            return self.tensors["U"] @ self.tensors["V"]
        if self.kind == "dense":
            return self.tensors["W"].clone()
        w = torch.zeros(self.d_in, self.d_out, dtype=torch.float32, device=self._device)
        for i, o, b in self.blocks:
            rows = torch.arange(self.d_in, device=w.device)[i] if isinstance(i, slice) else i
            cols = torch.arange(self.d_out, device=w.device)[o] if isinstance(o, slice) else o
            w[rows.unsqueeze(1), cols.unsqueeze(0)] = b
        return w

    @property
    def _device(self):
        return next(iter(self.tensors.values())).device if self.tensors else self.blocks[0][2].device

    @property
    def _concat(self) -> bool:
        # contiguous block-diagonal: outputs come out in order, no scatter needed
        return bool(self.blocks) and all(isinstance(i, slice) and isinstance(o, slice) for i, o, _ in self.blocks)

    def flops_per_token(self) -> int:
        """Forward FLOPs of apply() for one input row, as applied (not as a dense matmul)."""
        if self.kind == "lowrank":
            r = self.tensors["U"].shape[1]
            return 2 * r * (self.d_in + self.d_out)
        if self.kind == "dense":
            return 2 * self.d_in * self.d_out
        return sum(2 * b.shape[0] * b.shape[1] for _, _, b in self.blocks)

    def to(self, device) -> CrystalMatrix:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return CrystalMatrix(self.d_in, self.d_out, self.kind, {k: move(v) for k, v in self.tensors.items()},
                             [(move(i), move(o), move(b)) for i, o, b in self.blocks])


def _take(x: torch.Tensor, index) -> torch.Tensor:
    return x[..., index] if isinstance(index, slice) else x.index_select(-1, index)


def _as_slice(index: torch.Tensor):
    """A contiguous ascending index set as a slice (cheaper to apply than a gather)."""
    if len(index) and bool((index[1:] - index[:-1] == 1).all()):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


# --- generation: each family returns its stored tensors (quantized where it is) -------------

def _ternary(g, shape, levels: int) -> torch.Tensor:
    if levels == 3:
        probs = torch.tensor([0.25, 0.5, 0.25])
    else:
        probs = torch.tensor([0.15, 0.2, 0.3, 0.2, 0.15])
    draws = torch.multinomial(probs, math.prod(shape), replacement=True, generator=g)
    return (draws - len(probs) // 2).to(torch.int8).reshape(shape)


def _signs(g, shape) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(torch.int8)


def _partition(g, units: int) -> list[int]:
    """`units` into p parts of sizes between units/8 and units/4 (p from 4 to 8 where it fits)."""
    lo, hi = max(1, math.ceil(units / 8)), max(1, units // 4)
    p_min, p_max = max(1, math.ceil(units / hi)), max(1, units // lo)
    p = int(torch.randint(max(4, p_min) if p_min <= 4 <= p_max else p_min,
                          min(8, p_max) + 1 if p_min <= 8 else p_min + 1, (1,), generator=g))
    sizes = [lo] * p
    left = units - lo * p
    while left > 0:
        k = int(torch.randint(0, p, (1,), generator=g))
        add = min(left, hi - sizes[k], 1 + int(torch.randint(0, max(1, units // 16), (1,), generator=g)))
        if add > 0:
            sizes[k] += add
            left -= add
    return sizes


def _gen_block_diag(g, d_in, d_out, **_):
    unit = math.gcd(d_in, d_out)
    parts = _partition(g, unit)
    stored, variant = {}, {"blocks": len(parts), "low_rank_blocks": 0}
    start_in = start_out = 0
    for k, part in enumerate(parts):
        k_in, k_out = part * d_in // unit, part * d_out // unit
        stored[f"in{k}"] = torch.arange(start_in, start_in + k_in, dtype=torch.int32)
        stored[f"out{k}"] = torch.arange(start_out, start_out + k_out, dtype=torch.int32)
        if torch.rand((), generator=g) < 0.5:
            stored[f"B{k}"] = torch.randn(k_in, k_out, generator=g)
        else:
            r = 1 + int(torch.randint(0, max(1, min(k_in, k_out) // 4), (1,), generator=g))
            stored[f"B{k}_u"] = torch.randn(k_in, r, generator=g)
            stored[f"B{k}_v"] = torch.randn(r, k_out, generator=g)
            variant["low_rank_blocks"] += 1
        start_in, start_out = start_in + k_in, start_out + k_out
    return "blocks", stored, variant


def _gen_ternary_lowrank(g, d_in, d_out, *, ternary_levels, max_rank_fraction, **_):
    max_rank = max(1, int(min(d_in, d_out) * max_rank_fraction))
    r = 1 + int(torch.randint(0, max_rank, (1,), generator=g))
    for _attempt in range(100):
        u, v = _ternary(g, (d_in, r), ternary_levels), _ternary(g, (r, d_out), ternary_levels)
        if (u.float() @ v.float()).abs().sum() > 0:
            break
    return "lowrank", {"U": u, "V": v}, {"levels": ternary_levels, "rank": r}


def _gen_structured_sparse(g, d_in, d_out, **_):
    pattern = ("row", "column", "checkerboard", "random")[int(torch.randint(0, 4, (1,), generator=g))]
    density = (0.2, 0.5, 0.8)[int(torch.randint(0, 3, (1,), generator=g))]
    variant = {"pattern": pattern}
    if pattern == "random":
        mask = torch.rand(d_in, d_out, generator=g) < density
        return "dense", {"W": _signs(g, (d_in, d_out)) * mask.to(torch.int8)}, variant
    if pattern == "row":
        keep = torch.randperm(d_in, generator=g)[:max(1, round(density * d_in))].sort().values
        return "blocks", {"in0": keep.int(), "out0": torch.arange(d_out, dtype=torch.int32),
                          "S0": _signs(g, (len(keep), d_out))}, variant
    if pattern == "column":
        keep = torch.randperm(d_out, generator=g)[:max(1, round(density * d_out))].sort().values
        return "blocks", {"in0": torch.arange(d_in, dtype=torch.int32), "out0": keep.int(),
                          "S0": _signs(g, (d_in, len(keep)))}, variant
    # checkerboard: cell (i, j) is set when (i // period_in + j // period_out) is even
    unit = math.gcd(d_in, d_out)
    # an odd width has no equal halves: period 1 still alternates, one parity a row or column larger
    periods = [p for p in (1, 2, 4, 8, 16, 32) if unit % (2 * p) == 0] or [1]
    period = periods[int(torch.randint(0, len(periods), (1,), generator=g))]
    p_in, p_out = period * d_in // unit, period * d_out // unit
    rows, cols = torch.arange(d_in) // p_in % 2, torch.arange(d_out) // p_out % 2
    stored = {}
    for k, parity in enumerate((0, 1)):
        i, o = (rows == parity).nonzero().flatten(), (cols == parity).nonzero().flatten()
        stored.update({f"in{k}": i.int(), f"out{k}": o.int(), f"S{k}": _signs(g, (len(i), len(o)))})
    variant["period"] = period
    return "blocks", stored, variant


def _gen_dense_quantized(g, d_in, d_out, **_):
    if torch.rand((), generator=g) < 0.5:
        return "dense", {"W": _ternary(g, (d_in, d_out), 3)}, {"values": "ternary"}
    w = (torch.randn(d_in, d_out, generator=g) * 2.5).round().clamp(-8, 7).to(torch.int8)
    return "dense", {"W": w}, {"values": "int4"}


def _gen_svd(g, d_in, d_out, *, svd_bases, max_rank_fraction, **_):
    """A rank-r window of singular components of one reference matrix of this shape."""
    if not svd_bases:
        raise ValueError("the svd family needs reference matrices (a trained checkpoint)")
    layer = int(torch.randint(0, len(svd_bases), (1,), generator=g))
    u, s, vh = svd_bases[layer]
    max_rank = max(1, int(min(d_in, d_out) * max_rank_fraction))
    r = 1 + int(torch.randint(0, max_rank, (1,), generator=g))
    start = 0 if torch.rand((), generator=g) < 0.5 else int(torch.randint(0, len(s) - r + 1, (1,), generator=g))
    window = slice(start, start + r)
    return "lowrank", {"U": (u[:, window] * s[window]).contiguous(), "V": vh[window].contiguous()}, \
        {"reference_layer": layer, "rank": r, "first_component": start}


_GENERATORS = {"block_diag": _gen_block_diag, "ternary_lowrank": _gen_ternary_lowrank,
               "structured_sparse": _gen_structured_sparse, "dense_quantized": _gen_dense_quantized,
               "svd": _gen_svd}


def family_counts(size: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of size × share, in FAMILIES order."""
    raw = {f: size * shares.get(f, 0.0) for f in FAMILIES}
    counts = {f: int(math.floor(v)) for f, v in raw.items()}
    for f in sorted(FAMILIES, key=lambda f: (-(raw[f] - counts[f]), FAMILIES.index(f)))[:size - sum(counts.values())]:
        counts[f] += 1
    return counts


def _family_of(index: int, counts: dict[str, int]) -> str:
    for f in FAMILIES:
        if index < counts[f]:
            return f
        index -= counts[f]
    raise IndexError(index)


def _build(kind: str, stored: dict[str, torch.Tensor], scale: float, d_in: int, d_out: int) -> CrystalMatrix:
    """The applied form of stored tensors: floats, with the scale folded in."""
    if kind == "lowrank":
        return CrystalMatrix(d_in, d_out, kind, {"U": stored["U"].float(), "V": stored["V"].float() * scale})
    if kind == "dense":
        return CrystalMatrix(d_in, d_out, kind, {"W": stored["W"].float() * scale})
    blocks, k = [], 0
    while f"in{k}" in stored:
        if f"B{k}" in stored:
            b = stored[f"B{k}"]
        elif f"B{k}_u" in stored:
            b = stored[f"B{k}_u"] @ stored[f"B{k}_v"]
        else:
            b = stored[f"S{k}"].float()
        blocks.append((_as_slice(stored[f"in{k}"].long()), _as_slice(stored[f"out{k}"].long()), b * scale))
        k += 1
    return CrystalMatrix(d_in, d_out, kind, {}, blocks)


def _ideal_bits(stored: dict[str, torch.Tensor], variant: dict, d_in, d_out) -> float:
    """Bits a packed encoding of the factored form needs: values at log2(levels), indices at log2(d),
    float tensors (the scale among them) at 32."""
    bits = 0.0
    index_bits = math.ceil(math.log2(max(d_in, d_out)))
    for name, t in stored.items():
        if name.startswith(("in", "out")):
            bits += t.numel() * index_bits
        elif t.dtype == torch.float32:
            bits += t.numel() * 32
        elif name.startswith("S"):
            bits += t.numel()  # a sign
        else:
            levels = {"int4": 16}.get(variant.get("values"), variant.get("levels", 3))
            bits += t.numel() * math.log2(levels)
    return bits / (d_in * d_out)


def generate_matrix(seed: int, bucket: str, index: int, d_in: int, d_out: int, family: str, stats_device="cpu",
                    **options) -> tuple[dict[str, torch.Tensor], dict, CrystalMatrix]:
    """One library matrix from (seed, bucket, index): stored tensors, manifest entry, applied form.
    Everything is computed on the CPU, so the library is the same bit for bit on every machine, but
    for the count of distinct values — a sort, most of the time at GPT-2 small shapes — which is
    exact on any device and runs on `stats_device`."""
    g = generator("clso-library", seed, bucket, index)
    kind, stored, variant = _GENERATORS[family](g, d_in, d_out, **options)
    unscaled = _build(kind, stored, 1.0, d_in, d_out).dense()
    norm = float(unscaled.norm())
    if norm == 0:
        raise AssertionError(f"library {bucket}[{index}] came out all zeros")
    scale = math.sqrt(d_out) / norm
    stored["scale"] = torch.tensor([scale], dtype=torch.float32)
    matrix = _build(kind, stored, scale, d_in, d_out)
    dense = matrix.dense()
    entry = {
        "index": index, "family": family, "kind": kind, **variant,
        "rank": _rank_bound(kind, stored, d_in, d_out),
        "density": round(float((dense != 0).float().mean()), 6),
        "distinct_values": int(torch.unique(dense.to(stats_device)).numel()),
        "bits_per_weight": round(_ideal_bits(stored, variant, d_in, d_out), 4),
        "flops_per_token": matrix.flops_per_token(),
        "frobenius_norm": round(float(dense.norm()), 6),
    }
    return stored, entry, matrix


def _rank_bound(kind, stored, d_in, d_out) -> int:
    """The rank the structure allows (the matrix may have less)."""
    if kind == "lowrank":
        return int(stored["U"].shape[1])
    if kind == "dense":
        return min(d_in, d_out)
    total, k = 0, 0
    while f"in{k}" in stored:
        cap = min(len(stored[f"in{k}"]), len(stored[f"out{k}"]))
        total += min(cap, stored[f"B{k}_u"].shape[1]) if f"B{k}_u" in stored else cap
        k += 1
    return min(total, d_in, d_out)


@dataclass
class Library:
    seed: int
    shapes: dict[str, tuple[int, int]]
    matrices: dict[str, list[CrystalMatrix]]
    manifest: dict

    @property
    def size(self) -> int:
        return len(next(iter(self.matrices.values())))

    @property
    def device(self) -> torch.device:
        return self.matrices[BUCKETS[0]][0]._device

    def apply(self, bucket: str, index: int, x: torch.Tensor, gain=None, bias=None) -> torch.Tensor:
        return self.matrices[bucket][index].apply(x, gain, bias)

    def dense(self, bucket: str, index: int) -> torch.Tensor:
        return self.matrices[bucket][index].dense()

    def flops_per_token(self, bucket: str, index: int) -> int:
        return self.manifest["buckets"][bucket]["matrices"][index]["flops_per_token"]

    def to(self, device) -> Library:
        return Library(self.seed, self.shapes, {b: [m.to(device) for m in ms] for b, ms in self.matrices.items()},
                       self.manifest)

    @classmethod
    def generate(cls, seed: int, n_embd: int, *, size: int, shares: dict[str, float], ternary_levels: int = 3,
                 max_rank_fraction: float = 0.25, n_inner: int | None = None,
                 reference: dict[str, list[torch.Tensor]] | None = None,
                 progress=None, stats_device="cpu", workers: int = 1) -> tuple[Library, dict[str, torch.Tensor]]:
        """`reference` (dense matrices of a trained model, by bucket) feeds the svd family. The
        library is drawn on the CPU, by `workers` threads (each matrix is a pure function of its
        seed: drawing several at once changes no bit); `stats_device` speeds up its manifest's
        statistics."""
        shapes = bucket_shapes(n_embd, n_inner)
        counts = family_counts(size, shares)
        options = {"ternary_levels": ternary_levels, "max_rank_fraction": max_rank_fraction}
        bases = {b: [torch.linalg.svd(w.float(), full_matrices=False) for w in (reference or {}).get(b, [])]
                 for b in shapes} if counts["svd"] else {b: [] for b in shapes}
        manifest = {"version": LIBRARY_VERSION, "seed": seed, "size": size, "n_embd": n_embd,
                    "family_counts": counts, "options": options, "buckets": {}}
        tensors, matrices = {}, {}
        jobs = [(bucket, index) for bucket in shapes for index in range(size)]

        def make(job):
            bucket, index = job
            return generate_matrix(seed, bucket, index, *shapes[bucket], _family_of(index, counts), stats_device,
                                   svd_bases=bases[bucket], **options)

        with ThreadPoolExecutor(workers) as pool:
            for (bucket, index), (stored, entry, matrix) in zip(jobs, pool.map(make, jobs)):
                tensors.update({f"{bucket}.{index}.{name}": t for name, t in stored.items()})
                info = manifest["buckets"].setdefault(bucket, {"d_in": shapes[bucket][0], "d_out": shapes[bucket][1],
                                                               "matrices": []})
                info["matrices"].append(entry)
                matrices.setdefault(bucket, []).append(matrix)
                if progress:
                    progress()
        return cls(seed, shapes, matrices, manifest), tensors

    TENSORS, MANIFEST = "library.safetensors", "manifest.json"  # a library's folder: its two files

    def save(self, folder: str | Path, tensors: dict[str, torch.Tensor]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / self.TENSORS,
                           # one metadata key: safetensors orders several at random in the header
                           save_safetensors(tensors, metadata={"clso": f"library/{LIBRARY_VERSION}"}))
        write_json_atomic(folder / self.MANIFEST, self.manifest)

    @classmethod
    def stored(cls, folder: str | Path) -> dict[str, torch.Tensor]:
        """The library's tensors as saved: packed (int8 ternary factors, index sets), not the floats it applies."""
        return load_safetensors((Path(folder) / cls.TENSORS).read_bytes())

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> Library:
        folder = Path(folder)
        fix = "rebuild it with `dvc repro -f library`"
        try:
            manifest = json.loads((folder / cls.MANIFEST).read_text(encoding="utf-8"))
            tensors = cls.stored(folder)
        except FileNotFoundError as e:
            raise ClsoError(f"{e.filename}: not found; run `dvc repro library` first") from None
        except (OSError, ValueError, SafetensorError) as e:
            raise ClsoError(f"{folder}: library files unreadable ({type(e).__name__}); {fix}") from None
        try:
            if manifest["version"] != LIBRARY_VERSION:
                raise ClsoError(f"{folder}/manifest.json: version {manifest['version']}, expected "
                                f"{LIBRARY_VERSION}; {fix}")
            shapes, matrices = {}, {}
            for bucket in BUCKETS:
                info = manifest["buckets"][bucket]
                d_in, d_out = int(info["d_in"]), int(info["d_out"])
                shapes[bucket] = (d_in, d_out)
                matrices[bucket] = []
                for entry in info["matrices"]:
                    prefix = f"{bucket}.{entry['index']}."
                    stored = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                    _check_stored(entry["kind"], stored, d_in, d_out)
                    matrices[bucket].append(_build(entry["kind"], stored, float(stored["scale"][0]), d_in, d_out))
                if len(matrices[bucket]) != manifest["size"]:
                    raise ValueError(f"{bucket} has {len(matrices[bucket])} matrices")
        except ClsoError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise ClsoError(f"{folder}: library manifest and tensors disagree ({type(e).__name__}: {e}); "
                            f"{fix}") from None
        return cls(int(manifest["seed"]), shapes, matrices, manifest).to(device)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_stored(kind: str, stored: dict, d_in: int, d_out: int) -> None:
    """Shapes and index ranges, so a hostile file cannot index out of bounds."""
    if "scale" not in stored or stored["scale"].numel() != 1 or not math.isfinite(float(stored["scale"][0])):
        raise ValueError("missing or bad scale")
    if kind == "lowrank":
        u, v = stored["U"], stored["V"]
        if u.ndim != 2 or v.ndim != 2 or u.shape[0] != d_in or v.shape[1] != d_out or u.shape[1] != v.shape[0]:
            raise ValueError(f"low-rank factors of shapes {tuple(u.shape)}, {tuple(v.shape)}")
    elif kind == "dense":
        if tuple(stored["W"].shape) != (d_in, d_out):
            raise ValueError(f"dense matrix of shape {tuple(stored['W'].shape)}")
    elif kind == "blocks":
        k = 0
        while f"in{k}" in stored:
            i, o = stored[f"in{k}"], stored[f"out{k}"]
            for idx, bound in ((i, d_in), (o, d_out)):
                if idx.ndim != 1 or len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= bound:
                    raise ValueError(f"block {k} indices outside 0..{bound - 1}")
            if f"B{k}" in stored:
                shape = tuple(stored[f"B{k}"].shape)
            elif f"B{k}_u" in stored:
                shape = (stored[f"B{k}_u"].shape[0], stored[f"B{k}_v"].shape[1])
                if stored[f"B{k}_u"].shape[1] != stored[f"B{k}_v"].shape[0]:
                    raise ValueError(f"block {k} factors do not chain")
            else:
                shape = tuple(stored[f"S{k}"].shape)
            if shape != (len(i), len(o)):
                raise ValueError(f"block {k} of shape {shape} for {len(i)}×{len(o)} indices")
            k += 1
        if k == 0:
            raise ValueError("no blocks")
    else:
        raise ValueError(f"unknown kind {kind!r}")


_CATEGORIES = {"family": FAMILIES, "kind": ("lowrank", "blocks", "dense"),
               "pattern": ("row", "column", "checkerboard", "random"), "values": ("ternary", "int4")}


def structure_features(manifest: dict) -> torch.Tensor:
    """What a matrix is, from its manifest entry, as numbers a surrogate can learn from (the way NAS
    predictors describe operations): one-hots of family, kind, mask pattern and value set, and the
    standardised rank share, density, bits per weight, FLOPs share and log distinct values (not the
    norm, which the library makes √d_out for every matrix). Shape (buckets in BUCKETS order, M, features)."""
    rows = []
    for bucket in BUCKETS:
        info = manifest["buckets"][bucket]
        d_in, d_out = info["d_in"], info["d_out"]
        for e in info["matrices"]:
            onehots = [float(e.get(key) == v) for key, values in _CATEGORIES.items() for v in values]
            rows.append(onehots + [e["rank"] / min(d_in, d_out), e["density"], e["bits_per_weight"],
                                   e["flops_per_token"] / (2 * d_in * d_out), math.log(e["distinct_values"])])
    table = torch.tensor(rows, dtype=torch.float32)
    numeric = slice(sum(len(v) for v in _CATEGORIES.values()), None)
    std = table[:, numeric].std(0)
    table[:, numeric] = (table[:, numeric] - table[:, numeric].mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return table.view(len(BUCKETS), -1, table.shape[1])


def library_metrics(library: Library, file: Path) -> dict:
    """Counts per family (the same in every bucket), mean density / rank / bits per bucket, and
    bytes on disk against dense float32."""
    first = library.manifest["buckets"][BUCKETS[0]]["matrices"]
    out = {"size": library.size, "families": {f: sum(e["family"] == f for e in first) for f in FAMILIES}, "buckets": {}}
    dense_bytes = 0
    for bucket, info in library.manifest["buckets"].items():
        entries, (d_in, d_out) = info["matrices"], library.shapes[bucket]
        dense_bytes += len(entries) * d_in * d_out * 4
        mean = lambda key: round(sum(e[key] for e in entries) / len(entries), 4)  # noqa: E731
        out["buckets"][bucket] = {
            "mean_density": mean("density"), "mean_rank": mean("rank"),
            "mean_bits_per_weight": mean("bits_per_weight"),
            "mean_flops_vs_dense": round(sum(e["flops_per_token"] for e in entries)
                                         / (len(entries) * 2 * d_in * d_out), 4),
        }
    out["file_bytes"] = Path(file).stat().st_size
    out["dense_float32_bytes"] = dense_bytes
    out["bytes_vs_dense"] = round(out["file_bytes"] / dense_bytes, 4)
    return out


def sanity_check(library: Library, reference: dict[str, torch.Tensor], gene_buckets: list[str]) -> dict:
    """The protocol's step 1: how close the library gets to each reference matrix.

    `reference` holds dense weights (d_in × d_out) in genome order. For each, the relative
    Frobenius error ‖W − B‖/‖W‖ of the best library matrix B of its bucket, and the same with the
    best scalar gain g (‖W − g·B‖/‖W‖ = √(1 − cos²)), the most the search's own operators reach:
    it picks one matrix per layer and, in hybrid mode, trains its gain; it never combines matrices.
    The protocol calls a library whose best error exceeds SANITY_MAX_ERROR (20 %) too weak.
    Runs on the library's device; each library matrix is made dense once for every layer of its bucket.
    """
    refs = {name: (w.float().to(library.device), bucket) for (name, w), bucket in zip(reference.items(), gene_buckets)}
    norms = {name: float(w.norm()) for name, (w, _) in refs.items()}
    best = dict.fromkeys(refs, math.inf)
    best_gain = dict.fromkeys(refs, math.inf)
    for bucket in dict.fromkeys(gene_buckets):
        names = [name for name, (_, b) in refs.items() if b == bucket]
        for m in library.matrices[bucket]:
            b = m.dense()
            b_norm = float(b.norm())
            for name in names:
                w, norm = refs[name][0], norms[name]
                best[name] = min(best[name], float((w - b).norm()) / norm)
                cos = float((w * b).sum()) / (norm * b_norm)
                best_gain[name] = min(best_gain[name], math.sqrt(max(0.0, 1 - cos * cos)))
    per_matrix = {name: {"best_rel_error": round(best[name], 4), "best_rel_error_with_gain": round(best_gain[name], 4)}
                  for name in refs}
    plain, gained = list(best.values()), list(best_gain.values())
    return {"matrices": per_matrix, "mean_best_rel_error": round(sum(plain) / len(plain), 4),
            "mean_best_rel_error_with_gain": round(sum(gained) / len(gained), 4),
            "worst_best_rel_error_with_gain": round(max(gained), 4),
            "protocol_max_error": SANITY_MAX_ERROR, "passes_protocol": max(gained) <= SANITY_MAX_ERROR}
