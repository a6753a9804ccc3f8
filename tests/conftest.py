import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never touch the network: the hub clients fail at once instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

WORDS = ("the crystal lattice holds a quiet light and every matrix keeps its place while the "
         "search walks from one genome to the next").split()


def make_text_corpus(folder: Path, n_docs: int = 12, lines: int = 40) -> Path:
    """A folder of small, distinct UTF-8 documents."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        body = "\n".join(" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(9))
                         for j in range(lines))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}: é ünïcode ✓\n{body}\n", encoding="utf-8")
    return folder


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    return make_text_corpus(tmp_path / "corpus")


@pytest.fixture
def stage_env():
    """Environment for running stages and dvc as subprocesses with this interpreter's tools."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def counted_flops(fn) -> int:
    """Matmul FLOPs of fn() by PyTorch's own counter (FlopCounterMode), CPU attention included:
    torch counts SDPA on GPUs but has no formula for its CPU kernel, so that one is added with
    torch's own SDPA formula."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    with FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}) as counter:
        fn()
    return counter.get_total_flops()


def copy_checkout(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of this checkout, copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def expand_stages(stages: dict, params: dict) -> dict:
    """dvc.yaml's stages as DVC runs them: each `matrix` stage becomes one stage per item, named
    STAGE@V1-V2 (DVC's naming), with ${item.KEY} and ${section.key} / ${section.key[i]} filled in."""
    import itertools
    import re

    def lookup(expr: str, item: dict):
        head, *rest = expr.split(".")
        value = item if head == "item" else params[head]
        for part in rest:
            key, *index = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part).groups()
            value = value[key]
            for i in re.findall(r"\[(\d+)\]", index[0] if index else ""):
                value = value[int(i)]
        return value

    def fill(node, item):
        if isinstance(node, str):
            whole = re.fullmatch(r"\$\{([^}]+)\}", node)
            if whole:
                return lookup(whole.group(1), item)
            return re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(m.group(1), item)), node)
        if isinstance(node, list):
            return [fill(x, item) for x in node]
        if isinstance(node, dict):
            return {fill(k, item): fill(v, item) for k, v in node.items()}
        return node

    out = {}
    for name, stage in stages.items():
        if "matrix" not in stage:
            out[name] = fill(stage, {})
            continue
        axes = {key: fill(values, {}) for key, values in stage["matrix"].items()}
        body = {k: v for k, v in stage.items() if k != "matrix"}
        for combo in itertools.product(*axes.values()):
            item = dict(zip(axes, combo))
            out[f"{name}@{'-'.join(map(str, combo))}"] = fill(body, item)
    return out


def prepare_text_corpus(root: Path, **corpus) -> Path:
    """make_text_corpus(root / "corpus", **corpus) prepared into root / "prepared" (BPE 300, 20 % val
    and test): the tests' small training data."""
    from clso.data.corpus import load_corpus
    from clso.data.tokens import prepare_dataset

    prepare_dataset(load_corpus(f"text:{make_text_corpus(root / 'corpus', **corpus)}"), root / "prepared",
                    corpus_name="t", tokenizer_kind="bpe", vocab_size=300, val_fraction=0.2, test_fraction=0.2, seed=0)
    return root / "prepared"


@pytest.fixture(scope="module")
def tiny_gpt2_search(tmp_path_factory):
    """A prepared corpus, a 10-matrix library and a 1-block GPT-2 of width 16 to search over."""
    from types import SimpleNamespace

    from clso.model.library import Library

    root = tmp_path_factory.mktemp("gpt2")
    prepare_text_corpus(root)
    lib, tensors = Library.generate(0, 16, size=10, shares={"ternary_lowrank": 0.5, "block_diag": 0.5})
    lib.save(root / "library", tensors)
    model = SimpleNamespace(n_layer=1, n_embd=16, n_head=2, block_size=16, tie_embeddings=True, layer_gains=True)
    return root, model
