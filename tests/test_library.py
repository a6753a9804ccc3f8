import json
import math

import pytest
import torch

from clso import ClsoError
from clso.model.library import (
    BUCKETS,
    Library,
    _ideal_bits,
    bucket_shapes,
    family_counts,
    generate_matrix,
    library_metrics,
    sanity_check,
)

SHARES = {"block_diag": 0.25, "ternary_lowrank": 0.45, "structured_sparse": 0.25, "dense_quantized": 0.05}


@pytest.fixture(scope="module")
def lib32():
    return Library.generate(7, 32, size=40, shares=SHARES)


def entries(lib, family):
    for bucket in BUCKETS:
        for e in lib.manifest["buckets"][bucket]["matrices"]:
            if e["family"] == family:
                yield bucket, e, lib.matrices[bucket][e["index"]]


def test_family_counts_follow_the_shares():
    assert family_counts(40, SHARES) == {"block_diag": 10, "ternary_lowrank": 18, "structured_sparse": 10,
                                         "dense_quantized": 2, "svd": 0}
    assert sum(family_counts(7, SHARES).values()) == 7
    assert family_counts(5, {"ternary_lowrank": 1.0})["ternary_lowrank"] == 5


def test_one_library_per_shape_never_padded():
    assert bucket_shapes(32) == {"c_attn": (32, 96), "attn_proj": (32, 32), "c_fc": (32, 128), "mlp_proj": (128, 32)}


def test_every_matrix_preserves_variance_and_applies_like_its_dense_form(lib32):
    lib, _ = lib32
    for bucket in BUCKETS:
        d_in, d_out = lib.shapes[bucket]
        x = torch.randn(5, 3, d_in)
        for m in lib.matrices[bucket]:
            dense = m.dense()
            assert dense.shape == (d_in, d_out)
            assert float(dense.norm() ** 2) == pytest.approx(d_out, rel=1e-4)
            torch.testing.assert_close(m.apply(x), x @ dense, rtol=1e-5, atol=1e-5)
            gain, bias = torch.tensor(0.5), torch.randn(d_out)
            torch.testing.assert_close(m.apply(x, gain, bias), 0.5 * (x @ dense) + bias, rtol=1e-5, atol=1e-5)


def test_ternary_lowrank_structure(lib32):
    lib, tensors = lib32
    seen = 0
    for bucket, e, m in entries(lib, "ternary_lowrank"):
        d_in, d_out = lib.shapes[bucket]
        u, v = tensors[f"{bucket}.{e['index']}.U"], tensors[f"{bucket}.{e['index']}.V"]
        assert set(u.unique().tolist()) <= {-1, 0, 1} and set(v.unique().tolist()) <= {-1, 0, 1}
        assert 1 <= e["rank"] <= min(d_in, d_out) // 4 and u.shape == (d_in, e["rank"])
        assert torch.linalg.matrix_rank(m.dense()) <= e["rank"]
        assert e["flops_per_token"] == 2 * e["rank"] * (d_in + d_out)
        seen += 1
    assert seen == 4 * 18


def test_five_level_factors():
    stored, entry, _ = generate_matrix(3, "c_fc", 0, 32, 128, "ternary_lowrank", ternary_levels=5,
                                       max_rank_fraction=0.25)
    assert set(stored["U"].unique().tolist()) <= {-2, -1, 0, 1, 2} and entry["levels"] == 5


def test_block_diag_structure(lib32):
    lib, tensors = lib32
    for bucket, e, m in entries(lib, "block_diag"):
        d_in, d_out = lib.shapes[bucket]
        assert 4 <= e["blocks"] <= 8
        dense, mask = m.dense(), torch.zeros(d_in, d_out, dtype=torch.bool)
        for k in range(e["blocks"]):
            i = tensors[f"{bucket}.{e['index']}.in{k}"].long()
            o = tensors[f"{bucket}.{e['index']}.out{k}"].long()
            assert d_in / 8 <= len(i) <= d_in / 4 and len(o) * d_in == len(i) * d_out  # same share of both sides
            mask[i.min():i.max() + 1, o.min():o.max() + 1] = True
        assert (dense[~mask] == 0).all()  # nothing outside the diagonal blocks
        assert e["flops_per_token"] == 2 * int(mask.sum())


def test_structured_sparse_structure(lib32):
    lib, _ = lib32
    patterns = set()
    for bucket, e, m in entries(lib, "structured_sparse"):
        dense = m.dense()
        values = dense.unique()
        c = float(values.abs().max())
        assert all(math.isclose(abs(float(v)), c, rel_tol=1e-6) or v == 0 for v in values)  # 0 and ±C only
        patterns.add(e["pattern"])
        if e["pattern"] == "row":
            assert (dense != 0).any(1).float().mean() == pytest.approx(e["density"], abs=1e-6)
        if e["pattern"] == "column":
            assert (dense != 0).any(0).float().mean() == pytest.approx(e["density"], abs=1e-6)
        if e["pattern"] == "checkerboard":
            assert e["density"] == pytest.approx(0.5, abs=0.02)
    assert patterns == {"row", "column", "checkerboard", "random"}


# docs/model.md's table row for structured_sparse, word for word: the test below holds the code to it.
SPARSE_ROW = "row, column or random masks at 20/50/80 % density, or a checkerboard (50 %)"


def test_structured_sparse_densities_are_what_the_docs_say():
    from tests.conftest import REPO
    row = next(line for line in (REPO / "docs/model.md").read_text().splitlines()
               if line.startswith("| `structured_sparse` |"))
    assert SPARSE_ROW in row
    lib, _ = Library.generate(11, 32, size=60, shares={"structured_sparse": 1.0})
    drawn = {"row": set(), "column": set(), "random": set(), "checkerboard": set()}
    for _, e, _ in entries(lib, "structured_sparse"):
        if e["pattern"] == "checkerboard":
            assert e["density"] == 0.5
            drawn["checkerboard"].add(0.5)
            continue
        nearest = min((0.2, 0.5, 0.8), key=lambda d: abs(d - e["density"]))
        # row/column masks round density·d to whole rows; random masks draw each cell
        assert abs(e["density"] - nearest) < 0.07, e
        drawn[e["pattern"]].add(nearest)
    assert drawn == {"row": {0.2, 0.5, 0.8}, "column": {0.2, 0.5, 0.8}, "random": {0.2, 0.5, 0.8},
                     "checkerboard": {0.5}}


def test_ideal_bits_count_values_at_log2_levels_and_indices_at_log2_d():
    scale = {"scale": torch.ones(1)}  # stored with every matrix, counted once
    lowrank = {"U": torch.zeros(32, 4, dtype=torch.int8), "V": torch.zeros(4, 96, dtype=torch.int8), **scale}
    assert _ideal_bits(lowrank, {"levels": 3, "rank": 4}, 32, 96) == pytest.approx(
        ((32 + 96) * 4 * math.log2(3) + 32) / (32 * 96))
    rows = {"in0": torch.arange(8, dtype=torch.int32), "out0": torch.arange(96, dtype=torch.int32),
            "S0": torch.ones(8, 96, dtype=torch.int8), **scale}
    assert _ideal_bits(rows, {"pattern": "row"}, 32, 96) == pytest.approx(((8 + 96) * 7 + 8 * 96 + 32) / (32 * 96))
    int4 = {"W": torch.zeros(32, 32, dtype=torch.int8), **scale}
    assert _ideal_bits(int4, {"values": "int4"}, 32, 32) == pytest.approx((32 * 32 * 4 + 32) / (32 * 32))


def test_dense_quantized_has_few_distinct_values(lib32):
    lib, _ = lib32
    for _, e, _ in entries(lib, "dense_quantized"):
        assert e["distinct_values"] <= (3 if e["values"] == "ternary" else 16)
        assert e["rank"] == min(lib.shapes["c_attn"])


def test_same_seed_same_bytes_other_seed_other_matrices(tmp_path):
    (a, ta), (b, tb) = (Library.generate(1, 16, size=12, shares=SHARES) for _ in range(2))
    a.save(tmp_path / "a", ta)
    b.save(tmp_path / "b", tb)
    for name in ("library.safetensors", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c, _ = Library.generate(2, 16, size=12, shares=SHARES)
    assert not torch.equal(a.dense("c_fc", 5), c.dense("c_fc", 5))


def test_saved_library_loads_back(lib32, tmp_path):
    lib, tensors = lib32
    lib.save(tmp_path, tensors)
    back = Library.load(tmp_path)
    assert back.size == 40 and back.seed == 7
    for bucket in BUCKETS:
        for i in (0, 17, 39):
            assert torch.equal(back.dense(bucket, i), lib.dense(bucket, i))
    metrics = library_metrics(back, tmp_path / "library.safetensors")
    assert metrics["families"] == family_counts(40, SHARES)
    assert 0 < metrics["bytes_vs_dense"] < 1


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "library.safetensors").write_bytes((d / "library.safetensors").read_bytes()[:1000]),
     "unreadable"),
    (lambda d: (d / "manifest.json").unlink(), "not found"),
    (lambda d: (d / "manifest.json").write_text("[1, 2"), "unreadable"),
    (lambda d: _edit_manifest(d, lambda m: m["buckets"]["c_fc"]["matrices"][0].update(kind="sparse")), "disagree"),
    (lambda d: _edit_manifest(d, lambda m: m["buckets"]["c_fc"]["matrices"].pop()), "disagree"),
])
def test_damaged_library_is_a_clear_error(tmp_path, damage, message):
    lib, tensors = Library.generate(1, 16, size=8, shares=SHARES)
    lib.save(tmp_path, tensors)
    damage(tmp_path)
    with pytest.raises(ClsoError, match=message):
        Library.load(tmp_path)


def _edit_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_hostile_block_indices_are_rejected(tmp_path):
    lib, tensors = Library.generate(1, 16, size=4, shares={"block_diag": 1.0})
    tensors = dict(tensors)
    tensors["c_fc.0.in0"] = torch.tensor([0, 1, 99999], dtype=torch.int32)  # far outside d_in
    lib.save(tmp_path, tensors)
    with pytest.raises(ClsoError, match="outside"):
        Library.load(tmp_path)


def test_sanity_check_finds_a_library_member_and_measures_a_stranger():
    from clso.model.library import sanity_check
    lib, _ = Library.generate(2, 16, size=12, shares=SHARES)
    member = lib.dense("c_fc", 5) * 3.0  # a library matrix at another scale
    stranger = torch.randn(16, 64)
    result = sanity_check(lib, {"a": member, "b": stranger}, ["c_fc", "c_fc"])
    assert result["matrices"]["a"]["best_rel_error_with_gain"] < 1e-3
    assert result["matrices"]["a"]["best_rel_error"] == pytest.approx(2 / 3, abs=1e-3)
    assert result["matrices"]["b"]["best_rel_error_with_gain"] > 0.5
    assert not result["passes_protocol"] and result["protocol_max_error"] == 0.2


def test_svd_family_takes_windows_of_the_reference_spectrum():
    reference = {b: [torch.randn(*shape) for _ in range(2)] for b, shape in bucket_shapes(16).items()}
    lib, tensors = Library.generate(4, 16, size=6, shares={"svd": 1.0}, reference=reference)
    for bucket in BUCKETS:
        for e in lib.manifest["buckets"][bucket]["matrices"]:
            assert e["family"] == "svd" and e["kind"] == "lowrank"
            u, s_, vh = torch.linalg.svd(reference[bucket][e["reference_layer"]], full_matrices=False)
            window = slice(e["first_component"], e["first_component"] + e["rank"])
            expected = (u[:, window] * s_[window]) @ vh[window]
            cos = (expected * lib.dense(bucket, e["index"])).sum() / (expected.norm() * lib.dense(bucket, e["index"]).norm())
            assert float(cos) == pytest.approx(1.0, abs=1e-4)  # the same piece, rescaled
    with pytest.raises(ValueError, match="reference"):
        Library.generate(4, 16, size=2, shares={"svd": 1.0})


def test_an_odd_width_still_gives_checkerboards_that_load(tmp_path):
    lib, tensors = Library.generate(1, 9, size=40, shares={"structured_sparse": 1.0})
    lib.save(tmp_path, tensors)
    back = Library.load(tmp_path)
    boards = [e for e in back.manifest["buckets"]["attn_proj"]["matrices"] if e["pattern"] == "checkerboard"]
    assert boards and all(0.4 < e["density"] < 0.6 for e in boards)


def test_structure_features_describe_each_matrix_from_its_manifest_entry():
    from clso.model.library import FAMILIES, structure_features

    lib, _ = Library.generate(2, 16, size=20, shares=SHARES)
    table = structure_features(lib.manifest)
    assert table.shape[:2] == (4, 20)
    for b, bucket in enumerate(BUCKETS):
        for e in lib.manifest["buckets"][bucket]["matrices"]:
            row = table[b, e["index"]]
            assert row[:len(FAMILIES)].tolist() == [float(f == e["family"]) for f in FAMILIES]
    numeric = table[..., -5:].reshape(-1, 5)  # standardised: rank, density, bits, FLOPs, distinct values
    assert torch.allclose(numeric.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(numeric.std(0), torch.ones(5), atol=1e-5)
    onehots = table[..., :-5]
    assert (onehots.sum(-1) >= 2).all()  # a family and a kind at least, each exactly one of its set
    dense = [e["index"] for e in lib.manifest["buckets"]["c_fc"]["matrices"] if e["kind"] == "dense"]
    low = [e["index"] for e in lib.manifest["buckets"]["c_fc"]["matrices"] if e["kind"] == "lowrank"]
    flops = table[2, :, -2]  # dense matrices cost the most FLOPs, low-rank ones less
    assert flops[dense].min() > flops[low].max()


def test_drawing_matrices_side_by_side_changes_no_bit():
    """A GPU run keeps one torch thread and draws the library on a pool of the cores: the same
    library, bit for bit, as one matrix after another."""
    import threading

    import clso.model.library

    one_by_one = Library.generate(3, 32, size=12, shares=SHARES)
    threads, draw = set(), clso.model.library.generate_matrix

    def recorded(*args, **kwargs):
        threads.add(threading.get_ident())
        return draw(*args, **kwargs)

    clso.model.library.generate_matrix = recorded
    try:
        pooled = Library.generate(3, 32, size=12, shares=SHARES, workers=4)
    finally:
        clso.model.library.generate_matrix = draw
    assert len(threads) > 1  # really drawn side by side
    assert json.dumps(pooled[0].manifest) == json.dumps(one_by_one[0].manifest)
    assert list(pooled[1]) == list(one_by_one[1])
    assert all(torch.equal(pooled[1][k], one_by_one[1][k]) for k in one_by_one[1])


def test_sanity_check_is_the_best_over_every_pair():
    library = Library.generate(5, 16, size=6, shares=SHARES)[0]
    g = torch.Generator().manual_seed(0)
    reference = {f"h.{i}.{b}": torch.randn(*library.shapes[b], generator=g) for i in range(2) for b in BUCKETS}
    buckets = [b for _ in range(2) for b in BUCKETS]
    check = sanity_check(library, reference, buckets)
    for (name, w), bucket in zip(reference.items(), buckets):
        errors = [float((w - m.dense()).norm() / w.norm()) for m in library.matrices[bucket]]
        assert check["matrices"][name]["best_rel_error"] == round(min(errors), 4)
