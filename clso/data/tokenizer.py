"""Tokenizers, all saved as one `tokenizer.json` of the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from clso import ClsoError

EOT = "<|endoftext|>"  # ends every document, as in GPT-2
UNK = "<unk>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme) learned from `texts`: never feed it val or test."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def build_char(texts: Iterable[str]) -> Tokenizer:
    """One token per character seen in `texts`; anything else becomes <unk>."""
    chars = sorted(set().union(*(set(t) for t in texts)))
    vocab = {tok: i for i, tok in enumerate([UNK, EOT, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOT])
    return tok


def load_gpt2(local_dir: str = "") -> Tokenizer:
    """GPT-2's BPE from a folder with vocab.json and merges.txt, or from the hub."""
    if local_dir:
        folder = Path(local_dir).expanduser()
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise ClsoError(f"{f}: not found; prepare.gpt2_tokenizer_dir must hold GPT-2's "
                                "vocab.json and merges.txt")
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise ClsoError(f"{folder}: vocab.json/merges.txt cannot be read as a BPE ({e}); "
                            "use GPT-2's original files") from None
    else:
        try:
            tok = _from_hub("gpt2")
        except Exception as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ClsoError(f"tokenizer gpt2: cannot download it from the Hugging Face hub ({reason}); "
                            "set prepare.gpt2_tokenizer_dir to a folder with vocab.json and "
                            "merges.txt, or use prepare.tokenizer: bpe") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def _from_hub(name: str) -> Tokenizer:
    return Tokenizer.from_pretrained(name)


def make_tokenizer(kind: str, train_texts: list[str], *, vocab_size: int, gpt2_dir: str = "") -> Tokenizer:
    if kind == "bpe":
        return train_bpe(train_texts, vocab_size)
    if kind == "char":
        return build_char(train_texts)
    if kind == "gpt2":
        return load_gpt2(gpt2_dir)
    raise ClsoError(f"unknown tokenizer {kind!r}; valid: bpe, gpt2, char")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise ClsoError(f"{path}: not found; run `dvc repro prepare` first") from None
    except Exception as e:
        raise ClsoError(f"{path}: not a valid tokenizer.json ({type(e).__name__}); "
                        "re-create it with `dvc repro -f prepare`") from None
