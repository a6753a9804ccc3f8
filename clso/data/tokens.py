"""Token data: a corpus split by document, tokenized into uint16/uint32 memmaps, batches drawn
from them at random start positions, fixed evaluation windows, and the loss over a whole split.

data/prepared/
    train.bin val.bin test.bin   token ids, each document followed by <|endoftext|>
    tokenizer.json               trained on train.bin's documents only
    meta.json                    vocab, dtype, token counts, source hashes, the documents of each split
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clso import ClsoError
from clso.context import to_device
from clso.data.corpus import Corpus, Document, split_documents
from clso.data.tokenizer import EOT, load_tokenizer, make_tokenizer
from clso.io import atomic_dir, sha256_text, write_json_atomic
from clso.progress import progress_bar

SPLITS = ("train", "val", "test")
META_VERSION = 1
ENCODE_BATCH_DOCS = 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def document_text(docs: list[Document]) -> str:
    """The text a split's .bin decodes back to: each document followed by <|endoftext|>."""
    return "".join(d.text + EOT for d in docs)


def prepare_dataset(corpus: Corpus, out_dir: str | Path, *, corpus_name: str, tokenizer_kind: str,
                    vocab_size: int, gpt2_dir: str = "", val_fraction: float, test_fraction: float,
                    seed: int) -> dict:
    """Split, train the tokenizer on train only, and write the memmaps. Returns meta.json's content."""
    if corpus.official_splits is not None:
        splits, split_source = corpus.official_splits, "official"
    else:
        splits = split_documents(corpus.documents, val_fraction, test_fraction, seed)
        split_source = f"seeded shuffle of documents (seed {seed})"
    for name in SPLITS:
        if not any(d.text.strip() for d in splits[name]):
            raise ClsoError(f"the {name} split has no text; use a corpus with more documents")

    tokenizer = make_tokenizer(tokenizer_kind, [d.text for d in splits["train"]],
                               vocab_size=vocab_size, gpt2_dir=gpt2_dir)
    vocab = tokenizer.get_vocab_size()
    eot = tokenizer.token_to_id(EOT)
    dtype = token_dtype(vocab)

    meta = {
        "version": META_VERSION, "corpus": corpus_name, "tokenizer": tokenizer_kind,
        "vocab_size": vocab, "dtype": dtype.name, "eot_id": eot, "split_source": split_source,
        "tokens": {}, "chars": {}, "sha256": {}, "documents": {},
    }
    with atomic_dir(out_dir) as tmp, progress_bar() as bar:
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name in SPLITS:
            docs = splits[name]
            task = bar.add_task(f"tokenize {name}", total=len(docs), info="")
            count = 0
            with open(tmp / f"{name}.bin", "wb") as f:
                for start in range(0, len(docs), ENCODE_BATCH_DOCS):
                    batch = docs[start:start + ENCODE_BATCH_DOCS]
                    for enc in tokenizer.encode_batch([d.text for d in batch]):
                        ids = np.asarray(enc.ids + [eot], dtype=dtype)
                        ids.tofile(f)
                        count += ids.size
                    bar.update(task, advance=len(batch), info=f"{count:,} tokens")
            meta["tokens"][name] = count
            meta["chars"][name] = sum(len(d.text) for d in docs)
            meta["sha256"][name] = sha256_text(d.text for d in docs)
            meta["documents"][name] = [d.name for d in docs]
        meta["sha256"]["corpus"] = sha256_text(
            d.text for d in sorted((d for s in splits.values() for d in s), key=lambda d: d.name))
        write_json_atomic(tmp / TokenData.META, meta)
    return meta


@dataclass
class TokenData:
    """The prepared folder, validated: memmaps of each split and the tokenizer beside them."""

    folder: Path
    meta: dict
    META = "meta.json"  # the folder's description: vocab, dtype, token counts, each split's documents and hash

    @property
    def meta_file(self) -> Path:
        return self.folder / self.META

    @classmethod
    def open(cls, folder: str | Path) -> TokenData:
        folder = Path(folder)
        fix = "re-create it with `dvc repro -f prepare`"
        try:
            meta = json.loads((folder / cls.META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClsoError(f"{folder}/meta.json: not found; run `dvc repro prepare` first") from None
        except (OSError, ValueError) as e:
            raise ClsoError(f"{folder}/meta.json: unreadable ({type(e).__name__}); {fix}") from None
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
            raise ClsoError(f"{folder}/meta.json: not a version-{META_VERSION} meta file; {fix}")
        try:
            dtype = np.dtype(meta["dtype"])
            for name in SPLITS:
                size = (folder / f"{name}.bin").stat().st_size
                if size != int(meta["tokens"][name]) * dtype.itemsize:
                    raise ClsoError(f"{folder}/{name}.bin: {size} bytes, meta.json says "
                                    f"{meta['tokens'][name]} tokens of {dtype.name}; {fix}")
        except ClsoError:
            raise
        except FileNotFoundError as e:
            raise ClsoError(f"{e.filename}: not found; {fix}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ClsoError(f"{folder}/meta.json: field {e} missing or wrong; {fix}") from None
        return cls(folder, meta)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.folder / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")

    def tokenizer(self):
        return load_tokenizer(self.folder / "tokenizer.json")


def random_batch(tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows at random start positions: inputs and next-token targets."""
    if len(tokens) <= block_size:
        raise ClsoError(f"a split of {len(tokens)} tokens is too short for block_size {block_size}; "
                        "lower the block size or use more data")
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    window = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts])
    xy = to_device(torch.from_numpy(window), device)
    return xy[:, :-1], xy[:, 1:]


@dataclass(frozen=True)
class EvalBatch:
    """Fixed evaluation windows: `starts` are the batch ids, x/y the tokens they name."""

    starts: tuple[int, ...]
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, starts, block_size: int, device="cpu") -> EvalBatch:
        starts = tuple(int(s) for s in starts)
        if not starts or min(starts) < 0 or max(starts) + block_size + 1 > len(tokens):
            raise ValueError(f"batch windows outside a split of {len(tokens)} tokens")
        window = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts])
        xy = torch.from_numpy(window).to(device)
        return cls(starts, xy[:, :-1], xy[:, 1:])

    @classmethod
    def sample(cls, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, device="cpu") -> EvalBatch:
        starts = np.random.default_rng(seed).integers(0, len(tokens) - block_size - 1, size=batch_size)
        return cls.from_tokens(tokens, starts, block_size, device)


def split_targets(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """The next-token targets `split_loss` scores: those of its consecutive windows."""
    windows = (len(tokens) - 1) // block_size
    return np.asarray(tokens[1:windows * block_size + 1])


@torch.no_grad()
def split_loss(logits_fn, tokens: np.ndarray, block_size: int, batch_size: int, device="cpu") -> float:
    """Mean next-token loss over a whole split, in consecutive non-overlapping windows."""
    windows = (len(tokens) - 1) // block_size
    if windows < 1:
        raise ValueError(f"a split of {len(tokens)} tokens holds no window of {block_size}")
    total, count = 0.0, 0
    for first in range(0, windows, batch_size):
        starts = np.arange(first, min(first + batch_size, windows)) * block_size
        batch = EvalBatch.from_tokens(tokens, starts, block_size, device)
        logits = logits_fn(batch.x)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch.y.flatten(), reduction="sum"))
        count += batch.y.numel()
    return total / count


FINAL_BATCH = 16  # sequences per forward pass of the final scores: a contestant's record, every stage alike


def final_losses(logits_fn, data: TokenData, block_size: int, device="cpu") -> tuple[float, float]:
    """A finished model's loss on the whole val split and on the whole test split. Called once training
    and selection are done: this is the only read of the test split, and nothing after it trains or
    selects (tests/test_splits.py)."""
    return tuple(split_loss(logits_fn, data.tokens(split), block_size, FINAL_BATCH, device) for split in ("val", "test"))

