"""The .crystal format: both readers, the C runtime against PyTorch in every mode, hostile files."""

import re
import statistics
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from clso import ClsoError
from clso.data.tokenizer import build_char, train_bpe
from clso.export import format as fmt
from clso.export.compile import (
    RUNTIME_LOGIT_TOLERANCE,
    bench_runtime,
    build_runtime,
    check_runtime_logits,
    hf_model,
    run_runtime,
    runtime_logits,
)
from clso.export.fuzz import tiny_models, tiny_tokenizers
from clso.export.reader import read_crystal
from clso.export.reference import CrystalModel
from clso.export.writer import (
    TokenizerExport,
    build_crystal,
    build_crystal_with_report,
    crystalline_spec,
    dense_spec,
    export_tokenizer,
)
from clso.model.baseline import dense_gpt2
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return build_runtime(tmp_path_factory.mktemp("runtime") / "crystal")


@pytest.fixture(scope="module")
def crystalline():
    config = ModelConfig(vocab_size=24, n_layer=2, n_embd=16, n_head=2, block_size=16)
    shares = {"block_diag": 0.3, "ternary_lowrank": 0.3, "structured_sparse": 0.3, "dense_quantized": 0.1}
    library, stored = Library.generate(4, 16, size=24, shares=shares, ternary_levels=5)
    model = CrystallineGPT2(config, library, seed=1).eval()
    kinds = [e["kind"] for e in library.manifest["buckets"]["c_fc"]["matrices"]]
    # one gene of each kind (low-rank, blocks, dense) among the eight
    genome = [kinds.index("lowrank"), 0, kinds.index("blocks"), 1, kinds.index("dense"), 2, 3, 5]
    model.set_genome(genome)
    with torch.no_grad():
        for layer in model.layers:
            layer.gain.fill_(0.7)
    return model, crystalline_spec(model, stored, library.manifest)


def test_packing_round_trips():
    rng = np.random.default_rng(0)
    for n in (1, 4, 5, 6, 101):
        t = rng.integers(-1, 2, size=n)
        assert len(fmt.pack_trits(t)) == fmt.packed_bytes(fmt.TRIT5, n)
        assert np.array_equal(fmt.unpack_trits(fmt.pack_trits(t), n), t)
        q = rng.integers(-8, 8, size=n)
        assert np.array_equal(fmt.unpack_int4(fmt.pack_int4(q), n), q)
    with pytest.raises(fmt.CrystalFormatError, match="242"):
        fmt.unpack_trits(bytes([243]), 5)


def test_f32_file_reproduces_the_crystalline_model_and_keeps_its_structure(crystalline):
    model, spec = crystalline
    blob = build_crystal(spec, "f32")
    c = read_crystal(blob)
    x = torch.randint(0, 24, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(CrystalModel(c)(x), model(x), rtol=1e-5, atol=1e-5)
    names = c.tensors
    assert "h.0.c_attn.p0.u" in names and "h.0.c_attn.p0.v" in names  # low-rank stays two factors
    assert "h.0.c_fc.p1.in" in names and "h.0.c_fc.p0.out" in names  # blocks stay blocks
    assert c.dtypes["h.0.c_attn.p0.u"] == fmt.I4  # 5-level values: exact nibbles
    assert c.header["flags"] & fmt.FLAG_CRYSTALLINE
    for mode in fmt.MODES:  # integer library values are stored exactly whatever the mode
        q = read_crystal(build_crystal(spec, mode))
        assert q.dtypes["h.0.c_attn.p0.u"] == fmt.I4
        np.testing.assert_array_equal(q.tensors["h.0.c_attn.p0.u"], c.tensors["h.0.c_attn.p0.u"])


def _one_family(family):
    """A crystalline model whose eight layers all come from one library family."""
    config = ModelConfig(vocab_size=24, n_layer=2, n_embd=16, n_head=2, block_size=16)
    library, stored = Library.generate(5, 16, size=4, shares={family: 1.0})
    model = CrystallineGPT2(config, library, seed=1).eval()
    model.set_genome([0, 1, 2, 3, 1, 2, 3, 0])
    return model, crystalline_spec(model, stored, library.manifest)


def _library_factors(prefix, stored) -> dict[str, np.ndarray]:
    """What each part tensor must read back as, bit for bit, to be exact: the library's stored
    tensor (out × in), times the library scale in float32 unless it is a first factor (U, B_u)."""
    scale, factors = float(stored["scale"][0]), {}
    for key, t in stored.items():
        if m := re.fullmatch(r"([UVW])|[BS](\d+)(?:_([uv]))?", key):
            part = f"p0.{m[1].lower()}" if m[1] else f"p{m[2]}.{m[3] or 'w'}"
            factors[f"{prefix}.{part}"] = (t.float() * (1.0 if key.endswith(("U", "_u")) else scale)).t().numpy()
    return factors


@pytest.mark.parametrize("family", ["block_diag", "ternary_lowrank"])
def test_storage_report_says_which_layers_are_exact_and_is_right(family):
    model, spec = _one_family(family)
    x = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(0))  # not the global RNG: order-free
    with torch.no_grad():
        ref = model(x)
    factors = [_library_factors(layer, stored) for layer, (_, stored) in spec.layers.items()]
    assert all(factors)
    for mode in fmt.MODES:
        blob, report = build_crystal_with_report(spec, mode)
        c = read_crystal(blob)
        exactness, storage = report["exactness"], report["storage"]
        really_exact = sum(all(np.array_equal(c.tensors[name], want) for name, want in layer.items())
                           for layer in factors)
        assert exactness["crystalline_layers"] == 8 and exactness["exact_layers"] == really_exact, mode
        with torch.no_grad():
            error = float((CrystalModel(c)(x) - ref).abs().max())
        float_values = sum(t.numel() for _, stored in spec.layers.values() for t in stored.values()
                           if t.dtype == torch.float32 and t.ndim == 2)
        if family == "ternary_lowrank":  # integer codes: exact in every mode
            assert really_exact == 8 and exactness["float_matrix_values_outside_embeddings"] == 0, mode
            assert storage["quantized_float"]["values"] == 0 and storage["exact_integer"]["values"] > 0
            if mode != "int16" and mode != "int8":  # only the int modes quantize the embeddings
                # float32 rounding, which the LayerNorms of this tiny model amplify: up to 7e-5 over 300 inputs
                assert error < 1e-4, mode
        else:  # Gaussian blocks: exact in f32 only, quantized (and reported so) in the other modes
            assert exactness["float_matrix_values_outside_embeddings"] == float_values > 0
            assert really_exact == (8 if mode == "f32" else 0), mode
            assert storage["quantized_float"]["values"] == (0 if mode == "f32" else float_values)
            assert (error < 1e-5) == (mode == "f32"), (mode, error)
        quantized_embeddings = mode in ("int16", "int8")
        assert storage["embeddings"]["quantized_float"]["values"] == (24 * 16 + 16 * 16 if quantized_embeddings else 0)
        assert storage["embeddings"]["f32"]["values"] == (0 if quantized_embeddings else 24 * 16 + 16 * 16)
        embedding_bytes = sum(g["bytes"] for g in storage["embeddings"].values())
        assert exactness["embedding_share_of_bytes"] == embedding_bytes / len(blob)


def test_storage_report_accounts_for_every_byte(crystalline):
    _, spec = crystalline
    for mode in fmt.MODES:
        for keep in (None, np.arange(0, 24, 3)):
            blob, report = build_crystal_with_report(spec, mode, tiny_tokenizers()["bpe"], keep)
            c = read_crystal(blob)
            stored = {name: fmt.packed_bytes(c.dtypes[name], t.size) for name, t in c.tensors.items()}
            padding = sum(-n % fmt.ALIGNMENT for n in stored.values())
            s = report["storage"]
            assert s["overhead_bytes"] == c.header["data_offset"] + padding, mode
            groups = [s[k] for k in fmt.STORAGE] + list(s["embeddings"].values())
            assert sum(g["bytes"] for g in groups) == sum(stored.values())
            index = sum(n for name, n in stored.items() if c.dtypes[name] in (fmt.I32, fmt.U8))
            assert s["index"]["bytes"] == index > 0


def test_modes_trade_bytes_for_error_and_mixed_modes_keep_embeddings_f32(crystalline):
    model, spec = crystalline
    x = torch.randint(0, 24, (4, 16))
    with torch.no_grad():
        ref = model(x)
    size, error = {}, {}
    for mode in fmt.MODES:
        blob = build_crystal(spec, mode)
        c = read_crystal(blob)
        size[mode], error[mode] = len(blob), float((CrystalModel(c)(x) - ref).abs().max())
        embeddings_f32 = c.dtypes["wte"] == fmt.F32 and c.dtypes["wpe"] == fmt.F32
        assert embeddings_f32 == (mode in ("f32", "mixed16", "mixed8")), mode
    assert size["int8"] < size["int16"] < size["f32"] and size["mixed8"] < size["f32"]
    assert error["f32"] < 1e-5 and error["f32"] < error["int16"] < error["int8"] < 0.5
    assert error["mixed16"] < error["mixed8"]


def test_dense_file_reproduces_the_baseline_and_a_stock_gpt2_of_it(crystalline):
    model, _ = crystalline
    dense = model.dense_gpt2(model.genome)
    spec = dense_spec(dense, model.config)
    c = read_crystal(build_crystal(spec, "f32"))
    assert not c.header["flags"] & fmt.FLAG_CRYSTALLINE
    x = torch.randint(0, 24, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(CrystalModel(c)(x), dense(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf_model(c)(input_ids=x).logits, dense(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_pruned_vocabulary_keeps_the_kept_logits(crystalline):
    model, spec = crystalline
    keep = np.array([0, 2, 3, 7, 11, 20])
    c = read_crystal(build_crystal(spec, "f32", keep_tokens=keep))
    assert c.header["vocab_rows"] == 6 and c.header["flags"] & fmt.FLAG_PRUNED
    x = torch.from_numpy(np.array([[0, 3, 7, 2, 20, 11]]))
    with torch.no_grad():
        got, ref = CrystalModel(c)(x), model(x)
    torch.testing.assert_close(got[..., keep], ref[..., keep], rtol=1e-5, atol=1e-5)
    assert torch.isinf(got[..., 1]).all()
    with pytest.raises(ValueError, match="pruning"):
        CrystalModel(c)(torch.tensor([[1]]))


@pytest.mark.parametrize("mode", fmt.MODES)
def test_runtime_logits_equal_pytorch_in_every_mode(runtime, crystalline, tmp_path, mode):
    _, spec = crystalline
    for name, blob in {"crystalline": build_crystal(spec, mode, tiny_tokenizers()["bpe"]),
                       "pruned": build_crystal(spec, mode, keep_tokens=np.arange(0, 24, 2)),
                       "dense": build_crystal(dense_spec(crystalline[0].dense_gpt2(crystalline[0].genome),
                                                               crystalline[0].config), mode)}.items():
        path = tmp_path / f"{name}.crystal"
        path.write_bytes(blob)
        ids = np.array([0, 4, 2, 8, 6, 10, 12, 2, 22, 16, 14, 18])
        got = runtime_logits(runtime, path, ids)
        with torch.no_grad():
            ref = CrystalModel(read_crystal(blob))(torch.from_numpy(ids[None]))[0].double().numpy()
        assert got.shape == ref.shape == (12, 24)
        assert np.array_equal(np.isinf(got), np.isinf(ref))
        finite = np.isfinite(ref)
        np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-4, atol=1e-4, err_msg=f"{name} {mode}")


def test_every_tiny_model_runs_in_the_runtime(runtime, tmp_path):
    for name, blob in tiny_models().items():
        path = tmp_path / f"{name}.crystal"
        path.write_bytes(blob)
        c = read_crystal(blob)
        ids = np.flatnonzero(CrystalModel(c).row_of >= 0)[:5]
        with torch.no_grad():
            ref = CrystalModel(c)(torch.from_numpy(ids[None]))[0].numpy()
        got = runtime_logits(runtime, path, ids)
        finite = np.isfinite(ref)
        np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_runtime_encodes_like_the_tokenizer_and_generates_deterministically(runtime, crystalline, tmp_path, kind):
    tok = train_bpe([TEXT], 300) if kind == "bpe" else build_char([TEXT])
    exported = export_tokenizer(tok)
    vocab = len(exported.tokens)
    config = ModelConfig(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, block_size=64)
    dense = dense_gpt2(config, 0, "cpu").eval()
    path = tmp_path / "m.crystal"
    path.write_bytes(build_crystal(dense_spec(dense, config), "mixed8", exported))
    for text in ["First Citizen:\nSpeak,  speak.\n\n", "  you're all resolved?  ", "die than to famish", "Zq9 é!"]:
        got = run_runtime(runtime, "encode", path, text).stdout.decode().split()
        assert [int(t) for t in got] == tok.encode(text).ids, text
    args = ["generate", path, "-p", "First", "-n", "20", "-t", "0.9", "-k", "5", "-s", "3"]
    one, two = run_runtime(runtime, *args).stdout, run_runtime(runtime, *args).stdout
    other = run_runtime(runtime, *args[:-1], "4").stdout
    assert one == two and one.startswith(b"First") and len(one) > len(b"First\n")
    one.decode("utf-8")  # half characters of a byte-level BPE are held back or replaced, never printed raw
    assert other != one
    greedy = run_runtime(runtime, "generate", path, "-p", "First", "-n", "1", "-t", "0").stdout
    with torch.no_grad():
        first = dense(input_ids=torch.tensor([tok.encode("First").ids])).logits[0, -1].argmax()
    assert greedy == (b"First" + exported.tokens[int(first)]).decode("utf-8", "replace").encode() + b"\n"


def _header(blob: bytes, **changes) -> bytes:
    """Rewrite header fields and fix both checksums, so only the change itself is wrong."""
    names = fmt.HEADER_NAMES
    fields = dict(zip(names, fmt.HEADER.unpack_from(blob, 0)))
    fields.update(changes, header_crc32=0)
    head = fmt.HEADER.pack(*[fields[n] for n in names]).ljust(fmt.HEADER_BYTES, b"\0")
    fields["header_crc32"] = zlib.crc32(head)
    return fmt.HEADER.pack(*[fields[n] for n in names]).ljust(fmt.HEADER_BYTES, b"\0") + blob[fmt.HEADER_BYTES:]


def _entry(blob: bytes, index: int, **changes) -> bytes:
    """Rewrite one tensor-table entry and fix both checksums."""
    at = fmt.HEADER_BYTES + index * fmt.ENTRY_BYTES
    name, dtype, ndim, *rest = fmt.ENTRY.unpack_from(blob, at)
    fields = {"name": name, "dtype": dtype, "ndim": ndim, "shape": rest[:4], "offset": rest[4], "nbytes": rest[5],
              "scale": rest[6], "row_scales": rest[7], **changes}
    packed = fmt.ENTRY.pack(fields["name"], fields["dtype"], fields["ndim"], *fields["shape"], fields["offset"],
                           fields["nbytes"], fields["scale"], fields["row_scales"])
    body = bytearray(blob)
    body[at:at + len(packed)] = packed
    return _header(bytes(body), payload_crc32=zlib.crc32(bytes(body[fmt.HEADER_BYTES:])))


def _hostile_files(blob: bytes) -> dict[str, bytes]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    wte = 0
    return {
        "empty": b"", "short": blob[:100], "truncated": blob[:-64], "one byte short": blob[:-1],
        "bad magic": b"CRYSTAl" + blob[7:],
        "payload bit flip": bytes(flipped),
        "future version": _header(blob, version=fmt.VERSION + 1),
        "huge layer count": _header(blob, n_layer=100000),
        "head count not dividing": _header(blob, n_head=3),
        "table past the data": _header(blob, data_offset=fmt.HEADER_BYTES),
        "tensor past the end": _entry(blob, wte, offset=len(blob) - 64),
        "shape too big for its bytes": _entry(blob, wte, shape=(24, 17, 0, 0)),
        "overflowing shape": _entry(blob, wte, ndim=4, shape=(2**32 - 1,) * 4),
        "unknown dtype": _entry(blob, wte, dtype=99),
        "misaligned tensor": _entry(blob, wte, offset=fmt.ENTRY.unpack_from(blob, fmt.HEADER_BYTES)[7] + 4),
        "non-finite scale": _entry(blob, wte, scale=float("inf")),
        "row scales of itself": _entry(blob, wte, row_scales=0),
        "unterminated name": _entry(blob, wte, name=b"w" * 64),
    }


def test_hostile_files_are_rejected_by_both_readers_with_one_line(runtime, crystalline, tmp_path):
    _, spec = crystalline
    blob = build_crystal(spec, "mixed8", tiny_tokenizers()["bpe"])
    assert fmt.ENTRY.unpack_from(blob, fmt.HEADER_BYTES)[0].rstrip(b"\0") == b"wte"
    for what, data in _hostile_files(blob).items():
        with pytest.raises(fmt.CrystalFormatError):
            read_crystal(data)
        path = tmp_path / "bad.crystal"
        path.write_bytes(data)
        done = subprocess.run([str(runtime), "logits", str(path), "1"], capture_output=True, text=True)
        assert done.returncode == 1, what
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("crystal: error:"), (what, done.stderr)
        assert not done.stdout


def test_checks_behind_the_checksums_reject_corrupt_tables_too(crystalline):
    _, spec = crystalline
    blob = build_crystal(spec, "int8")
    corrupt = bytearray(blob)
    corrupt[fmt.HEADER_BYTES + 64] = 77  # the first tensor's dtype
    with pytest.raises(fmt.CrystalFormatError, match="checksum"):
        read_crystal(bytes(corrupt))
    with pytest.raises(fmt.CrystalFormatError, match="dtype"):
        read_crystal(bytes(corrupt), verify_checksums=False)


def test_header_and_entry_offsets_match_the_spec():
    def offsets(fmt):
        out, at = [], 0
        for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
            for _ in range(1 if code == "s" else int(count or 1)):
                out.append(at)
                at += struct.calcsize("<" + (count if code == "s" else "") + code)
        return out

    header = dict(zip(fmt.HEADER_NAMES, offsets(fmt.HEADER.format)))
    assert {k: header[k] for k in ("version", "n_tensors", "mode", "tokenizer_kind", "alignment", "layer_norm_eps",
                                   "table_offset", "data_offset", "file_bytes", "payload_crc32", "header_crc32",
                                   "architecture")} == {
        "version": 8, "n_tensors": 20, "mode": 24, "tokenizer_kind": 60, "alignment": 72, "layer_norm_eps": 76,
        "table_offset": 80, "data_offset": 88, "file_bytes": 96, "payload_crc32": 104, "header_crc32": 108,
        "architecture": 112}
    assert offsets(fmt.ENTRY.format) == [0, 64, 68, 72, 76, 80, 84, 88, 96, 104, 108]


def test_a_short_fuzz_run_finds_nothing(tmp_path):
    pytest.importorskip("atheris")
    from clso.export.fuzz import run

    result = run(tmp_path, runs=3000, seed=0)
    assert result["ok"], result["log_tail"]
    assert result["new_units"] and result["new_units"] > 0  # coverage guidance is working
    assert result["replay"]["files"] == result["corpus_files"] and not result["replay"]["failures"]


def _script(path, body: str):
    """An executable Python script standing in for the runtime."""
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\nargs = sys.argv\n{body}\n")
    path.chmod(0o755)
    return path


def test_runtime_benchmark_reports_the_medians_of_what_the_runtime_measured(crystalline, tmp_path):
    path = tmp_path / "m.crystal"
    path.write_bytes(build_crystal(crystalline[1], "mixed8", tiny_tokenizers()["bpe"]))
    # a stand-in whose generation loop takes 0.3, 0.1, 0.2 s by seed and makes what it is asked
    fake = _script(tmp_path / "fake", "n, seed = (int(args[args.index(o) + 1]) for o in ('-n', '-s'))\n"
                                      "sys.stderr.write(json.dumps({'new_tokens': n, 'seconds': [0.3, 0.1, 0.2][seed]}))")
    result = bench_runtime(fake, path, new_tokens=100, repeats=3, seed=0)
    assert result["new_tokens"] == 15  # the context (16) holds the start token and 15 more
    assert result["runtime_s"] == [0.3, 0.1, 0.2] and result["runtime_tokens_per_s"] == 75.0  # 15 / median 0.2
    torch_median, wall_median = statistics.median(result["torch_s"]), statistics.median(result["runtime_wall_s"])
    assert result["torch_tokens_per_s"] == pytest.approx(15 / torch_median, rel=1e-3)
    assert result["ratio"] == pytest.approx(torch_median / 0.2, abs=1e-3)  # ratios are rounded to 3 decimals
    assert result["ratio_with_process_start"] == pytest.approx(torch_median / wall_median, abs=1e-3)
    # a runtime that stops short must not pass for a fast one
    short = _script(tmp_path / "short", "print(json.dumps({'new_tokens': 3, 'seconds': 0.1}), file=sys.stderr)")
    with pytest.raises(AssertionError, match="made 3 tokens, asked 15"):
        bench_runtime(short, path, new_tokens=100, repeats=1)


def test_runtime_benchmark_times_the_real_runtime_with_and_without_process_start(runtime, crystalline, tmp_path):
    path = tmp_path / "m.crystal"
    path.write_bytes(build_crystal(crystalline[1], "mixed8", tiny_tokenizers()["bpe"]))
    result = bench_runtime(runtime, path, new_tokens=100, repeats=2)
    assert len(result["runtime_s"]) == len(result["runtime_wall_s"]) == len(result["torch_s"]) == 2
    assert all(0 < loop < wall for loop, wall in zip(result["runtime_s"], result["runtime_wall_s"]))
    assert result["ratio"] > result["ratio_with_process_start"] > 0
    # the same runtime started 0.3 s late: the figures with process start must drop, the loop's not see it
    slow = _script(tmp_path / "slow", f"time.sleep(0.3)\nos.execv({str(runtime)!r}, [{str(runtime)!r}, *args[1:]])")
    late = bench_runtime(slow, path, new_tokens=100, repeats=2)
    assert min(late["runtime_wall_s"]) >= 0.3 and late["runtime_tokens_per_s_with_process_start"] <= 15 / 0.3
    assert late["ratio_with_process_start"] <= statistics.median(late["torch_s"]) / 0.3
    assert late["ratio_with_process_start"] < result["ratio_with_process_start"]
    assert max(late["runtime_s"]) < 0.3


def test_runtime_logits_beyond_the_tolerance_are_an_error():
    python = np.array([[1.0, -5.0, -np.inf], [20.0, 3.0, -np.inf]])
    tolerance = RUNTIME_LOGIT_TOLERANCE * 20.0  # relative to the largest logit
    assert check_runtime_logits("m.crystal", python + [[0, 0.9 * tolerance, 0], [0, 0, 0]], python) \
        == pytest.approx(0.9 * tolerance)
    for bad in (python + [[0, 1.1 * tolerance, 0], [0, 0, 0]], np.where(python == 20.0, np.nan, python),
                python[:1], np.where(np.isinf(python), 0.0, python)):
        with pytest.raises(ClsoError, match="m.crystal: the C runtime's logits"):
            check_runtime_logits("m.crystal", bad, python)
    small = np.array([[0.01, -0.02]])  # logits near zero: the bound never falls under the absolute tolerance
    assert check_runtime_logits("m.crystal", small + 0.9 * RUNTIME_LOGIT_TOLERANCE, small) > 0


def test_runtime_prints_utf8_even_when_tokens_split_characters(runtime, tmp_path):
    # a tokenizer whose tokens are single bytes of multi-byte characters, and stray continuation bytes
    tokens = [bytes([b]) for b in "é€".encode()] + [b"\x80", b"\xff", b"a", b"<|endoftext|>"]
    export = TokenizerExport("bpe", tokens, [], len(tokens) - 1, None)
    config = ModelConfig(vocab_size=len(tokens), n_layer=1, n_embd=8, n_head=2, block_size=64)
    dense = dense_gpt2(config, 0, "cpu").eval()
    path = tmp_path / "bytes.crystal"
    path.write_bytes(build_crystal(dense_spec(dense, config), "f32", export))
    for seed in range(5):
        out = run_runtime(runtime, "generate", path, "-n", "60", "-t", "2", "-k", "0", "-s", seed).stdout
        assert out.decode("utf-8").endswith("\n")  # raw bytes never reach the terminal


def test_a_missing_compiler_is_one_clear_error(tmp_path):
    from clso import ClsoError

    with pytest.raises(ClsoError, match="C compiler 'no-such-cc' not found"):
        build_runtime(tmp_path / "crystal", cc="no-such-cc")
    with pytest.raises(ClsoError, match="compiling the C runtime failed"):
        build_runtime(tmp_path / "crystal", cflags="-fno-such-flag")
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
