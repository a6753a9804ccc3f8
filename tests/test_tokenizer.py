import json

import pytest
from tokenizers import pre_tokenizers

from clso import ClsoError
from clso.data import tokenizer as tk
from clso.data.tokenizer import EOT, UNK, build_char, load_gpt2, load_tokenizer, train_bpe

TEXTS = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind to suffer\n"] * 50


def test_bpe_is_byte_level_deterministic_and_round_trips():
    a, b = train_bpe(TEXTS, 300), train_bpe(TEXTS, 300)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 300 and a.token_to_id(EOT) is not None
    unseen = "Ünïcödé ✓ never seen 🎭\n"  # byte-level: nothing is unknown
    assert a.decode(a.encode(unseen).ids) == unseen


def test_char_tokenizer_round_trips_and_maps_unseen_chars_to_unk():
    tok = build_char(TEXTS)
    ids = tok.encode(TEXTS[0] + EOT).ids
    assert tok.decode(ids, skip_special_tokens=False) == TEXTS[0] + EOT
    assert tok.encode("Z").ids == [tok.token_to_id(UNK)]  # no capital Z in TEXTS


def _gpt2_files(folder):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["th"] = len(vocab)
    vocab["the"] = len(vocab)
    vocab[EOT] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e\n")


def test_gpt2_from_a_local_folder(tmp_path):
    _gpt2_files(tmp_path)
    tok = load_gpt2(str(tmp_path))
    enc = tok.encode("the theme")
    assert enc.tokens[0] == "the" and tok.decode(enc.ids) == "the theme"
    assert tok.token_to_id(EOT) == 258


def test_gpt2_missing_files_and_offline_hub_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ClsoError, match="merges.txt"):
        (tmp_path / "vocab.json").write_text("{}")
        load_gpt2(str(tmp_path))

    def offline(name):
        raise OSError("We cannot find the requested files in the local cache.")

    monkeypatch.setattr(tk, "_from_hub", offline)
    with pytest.raises(ClsoError, match="gpt2_tokenizer_dir") as err:
        load_gpt2("")
    assert "\n" not in str(err.value)


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ClsoError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(ClsoError, match="run `dvc repro prepare` first"):
        load_tokenizer(tmp_path / "absent.json")
