import json
import subprocess
import sys

import numpy as np
import pytest

from clso import ClsoError
from clso.data.corpus import Corpus, Document, load_corpus
from clso.data.tokenizer import EOT
from clso.data.tokens import TokenData, document_text, prepare_dataset, random_batch, token_dtype


def _prepare(corpus, out, **kw):
    args = dict(corpus_name="test", tokenizer_kind="bpe", vocab_size=400, val_fraction=0.2,
                test_fraction=0.2, seed=3)
    args.update(kw)
    return prepare_dataset(corpus, out, **args)


def test_prepare_writes_memmaps_that_decode_back_to_each_split(text_corpus, tmp_path):
    corpus = load_corpus(f"text:{text_corpus}")
    meta = _prepare(corpus, tmp_path / "prepared")
    data = TokenData.open(tmp_path / "prepared")
    tok = data.tokenizer()
    by_name = {d.name: d for d in corpus.documents}
    seen = set()
    for split in ("train", "val", "test"):
        names = meta["documents"][split]
        assert not seen & set(names)
        seen |= set(names)
        ids = data.tokens(split)
        assert ids.dtype == np.uint16 and len(ids) == meta["tokens"][split]
        text = document_text([by_name[n] for n in names])
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == text
    assert seen == set(by_name)
    assert 256 < meta["vocab_size"] <= 400 and meta["eot_id"] == tok.token_to_id(EOT)
    assert len(meta["sha256"]["train"]) == 64


def test_tokenizer_never_sees_val_or_test(tmp_path):
    # a word repeated only in held-out documents would become one BPE token if they leaked
    secret = "Zqxjvwkpfgh"
    train = [Document(f"t{i}", "plain words of training text here. " * 60) for i in range(4)]
    held = {s: [Document(f"{s}{i}", (secret + " ") * 300) for i in range(2)] for s in ("val", "test")}
    corpus = Corpus([*train, *held["val"], *held["test"]], official_splits={"train": train, **held})
    for kind in ("bpe", "char"):
        _prepare(corpus, tmp_path / kind, tokenizer_kind=kind)
        tok = TokenData.open(tmp_path / kind).tokenizer()
        if kind == "bpe":
            assert len(tok.encode(secret).ids) > 3
        else:
            assert tok.token_to_id("Z") is None and tok.token_to_id("q") is None
            assert tok.token_to_id("p") is not None


def test_same_inputs_give_byte_identical_outputs(text_corpus, tmp_path):
    corpus = load_corpus(f"text:{text_corpus}")
    _prepare(corpus, tmp_path / "a")
    _prepare(corpus, tmp_path / "b")
    for name in ("train.bin", "val.bin", "test.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_failed_prepare_leaves_the_old_output_untouched(text_corpus, tmp_path):
    corpus = load_corpus(f"text:{text_corpus}")
    out = tmp_path / "prepared"
    _prepare(corpus, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ClsoError):
        _prepare(corpus, out, tokenizer_kind="gpt2", gpt2_dir=str(tmp_path / "nowhere"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_large_vocabularies_use_uint32():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-2]), "val.bin"),
    (lambda d: (d / "meta.json").write_text("{ not json"), "meta.json: unreadable"),
    (lambda d: (d / "test.bin").unlink(), "test.bin: not found"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"version": 1})), "missing or wrong"),
])
def test_damaged_prepared_folder_is_a_clear_error(text_corpus, tmp_path, damage, message):
    out = tmp_path / "prepared"
    _prepare(load_corpus(f"text:{text_corpus}"), out)
    damage(out)
    with pytest.raises(ClsoError, match=message) as err:
        TokenData.open(out)
    assert "dvc repro" in str(err.value)


def test_random_batches_are_shifted_windows_fixed_by_the_seed():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = random_batch(tokens, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16)
    assert (y == x + 1).all() and (x[:, 1:] == x[:, :-1] + 1).all()
    assert int(y.max()) <= 999
    x2, _ = random_batch(tokens, 8, 16, np.random.default_rng(0))
    assert (x == x2).all()
    with pytest.raises(ClsoError, match="too short"):
        random_batch(tokens[:10], 2, 16, np.random.default_rng(0))


def test_prepare_stage_writes_data_and_metrics(text_corpus, tmp_path, stage_env):
    from tests.conftest import REPO
    params = (REPO / "params.yaml").read_text().replace("corpus: shakespeare", f"corpus: text:{text_corpus}")
    params = params.replace("vocab_size: 4096", "vocab_size: 300")
    (tmp_path / "params.yaml").write_text(params)
    run = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=stage_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics/detail/prepare.json").read_text())
    assert metrics["vocab_size"] == 300 and metrics["documents"] == {"train": 10, "val": 1, "test": 1}
    assert metrics["method"] in ("rapl", "estimate") and metrics["energy_wh"] > 0
    assert TokenData.open(tmp_path / "data/prepared").meta["tokens"] == metrics["tokens"]
    assert metrics["decode"] == {"errors": "strict", "files_with_replacements": 0, "files_skipped": 0}


@pytest.mark.parametrize("mode, documents, counts", [
    ("replace", 13, {"files_with_replacements": 1, "files_skipped": 0}),
    ("skip", 12, {"files_with_replacements": 0, "files_skipped": 1}),
])
def test_prepare_stage_counts_files_that_are_not_utf8(text_corpus, tmp_path, stage_env, mode, documents, counts):
    from tests.conftest import REPO
    (text_corpus / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n".encode("latin-1") * 40)
    params = (REPO / "params.yaml").read_text().replace("corpus: shakespeare", f"corpus: text:{text_corpus}")
    params = params.replace("vocab_size: 4096", "vocab_size: 300")
    params = params.replace("decode_errors: strict", f"decode_errors: {mode}")
    (tmp_path / "params.yaml").write_text(params)
    run = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=stage_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics/detail/prepare.json").read_text())
    assert metrics["decode"] == {"errors": mode, **counts}
    assert sum(metrics["documents"].values()) == documents
    assert f"(prepare.decode_errors: {mode}): latin1.txt" in run.stdout
