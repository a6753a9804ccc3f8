"""Differential fuzzing of the two .crystal readers with atheris (libFuzzer for Python).

Each input goes to the Python reader and, in the same process, to the C loader (crystal.c built
as a shared library). A crash, an exception other than CrystalFormatError, or the two readers
disagreeing on whether the file is valid, is a finding; libFuzzer then stops and writes the input
as crash-* in the work folder. The corpus the search grows is then replayed through the C loader
built with AddressSanitizer and UBSan where the compiler has them. Checksums are
skipped so that mutations reach the checks behind them. The seed corpus is a few tiny valid
files covering every dtype, both tokenizers, crystalline parts, neuron fields and a pruned vocabulary.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from clso import ClsoError
from clso.export.compile import build_runtime
from clso.export.writer import TokenizerExport, build_crystal, crystalline_spec, dense_spec, field_spec
from clso.field.model import FieldConfig, FieldLM
from clso.model.crystalline import CrystallineGPT2, ModelConfig
from clso.model.library import Library

SHARES = {"block_diag": 0.25, "ternary_lowrank": 0.35, "structured_sparse": 0.25, "dense_quantized": 0.15}


def tiny_tokenizers() -> dict[str, TokenizerExport]:
    """A byte-level BPE with a few merges and a character tokenizer, both of 24 ids."""
    byte_tokens = [bytes([b]) for b in b" abcdehilnorst\n"]
    bpe = byte_tokens + [b"th", b"the", b" the", b"er", b"in", b"on", b"<|endoftext|>", b"at", b"es"]
    ids = {t: i for i, t in enumerate(bpe)}
    merges = [(ids[b"t"], ids[b"h"], ids[b"th"]), (ids[b"th"], ids[b"e"], ids[b"the"]),
              (ids[b" "], ids[b"the"], ids[b" the"]), (ids[b"e"], ids[b"r"], ids[b"er"]),
              (ids[b"i"], ids[b"n"], ids[b"in"]), (ids[b"o"], ids[b"n"], ids[b"on"]),
              (ids[b"a"], ids[b"t"], ids[b"at"]), (ids[b"e"], ids[b"s"], ids[b"es"])]
    chars = [b"<unk>", b"<|endoftext|>"] + [c.encode() for c in " abcdefghilmnorstuwy\n,é"]
    return {"bpe": TokenizerExport("bpe", bpe, merges, ids[b"<|endoftext|>"], None),
            "char": TokenizerExport("char", chars[:24], [], 1, 0)}


def tiny_models(seed: int = 0) -> dict[str, bytes]:
    """Small valid files: dense and crystalline, every mode among them, a pruned vocabulary."""
    config = ModelConfig(vocab_size=24, n_layer=1, n_embd=16, n_head=2, block_size=16, layer_gains=True)
    library, stored = Library.generate(seed, 16, size=16, shares=SHARES)
    model = CrystallineGPT2(config, library, seed=seed)
    genome = [int(g) for g in np.random.default_rng(seed).integers(0, 16, size=len(model.layers))]
    model.set_genome(genome)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = model.dense_gpt2(genome)
        dense.transformer.wte.weight.data.normal_(0, 0.5)  # not tied to the crystalline model's values
    untied = ModelConfig(**{**config.__dict__, "tie_embeddings": False})
    tokenizers = tiny_tokenizers()
    crystal = crystalline_spec(model, stored, library.manifest)
    keep = np.array([0, 1, 2, 3, 5, 8, 13, 21])
    return {
        "dense-f32-bpe": build_crystal(dense_spec(dense, config), "f32", tokenizers["bpe"]),
        "dense-mixed8-untied": build_crystal(dense_spec(_untie(dense), untied), "mixed8", tokenizers["char"]),
        "crystal-int8-pruned": build_crystal(crystal, "int8", tokenizers["char"], keep_tokens=keep),
        "crystal-mixed16": build_crystal(crystal, "mixed16", tokenizers["bpe"]),
        "crystal-int16-no-tokenizer": build_crystal(crystal, "int16"),
        "field-mixed8-bpe": build_crystal(field_spec(tiny_field_lm(seed)), "mixed8", tokenizers["bpe"]),
        "field-int8-pruned": build_crystal(field_spec(tiny_field_lm(seed, n_layer=2)), "int8", tokenizers["char"],
                                           keep_tokens=keep),
        "flat-field-mixed16": build_crystal(field_spec(tiny_field_lm(seed, attention=False)), "mixed16",
                                            tokenizers["bpe"]),
    }


def tiny_field_lm(seed: int = 0, n_layer: int = 1, neurons: int = 5, vocab_size: int = 24,
                  block_size: int = 16, attention: bool = True) -> FieldLM:
    """A neuron-field LM whose fields hold `neurons` neurons of random positions, values and
    temperatures (a trained field's values are not zero; a newborn's are)."""
    config = FieldConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=16, n_head=2, block_size=block_size,
                         initial_neurons=neurons, max_neurons=2 * neurons, attention=attention)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FieldLM(config).eval()
        with torch.no_grad():
            for f in model.fields:
                f.positions.normal_()
                f.values.normal_(0, 0.3)
                f.temperatures.uniform_(-0.5, 0.8)
                f.birth_step[:neurons] = torch.arange(neurons)
                f.alive = neurons
    return model


def _untie(model):
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    return model


def sanitizer_flags(cc: str) -> list[str]:
    """-fsanitize=address,undefined when `cc` can build and run with it here, else nothing."""
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"clso-asan-probe-{os.getpid()}"
    try:
        done = subprocess.run([cc, "-fsanitize=address,undefined", "-x", "c", "-", "-o", str(probe)],
                              input="int main(void){return 0;}", capture_output=True, text=True)
        ok = done.returncode == 0 and subprocess.run([str(probe)], capture_output=True).returncode == 0
    except OSError:
        ok = False
    finally:
        probe.unlink(missing_ok=True)
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"] if ok else []


def run(workdir: str | Path, *, runs: int, seed: int = 0, cc: str = "cc", max_len: int = 0) -> dict:
    """Fuzz both readers for `runs` inputs, then replay the corpus it grew through the C loader
    built with sanitizers; a summary of what happened.

    Two steps because a sanitizer runtime preloaded into Python takes over libFuzzer's coverage
    hooks and blinds the search: the search runs on a plain build of the C library, the replay
    under AddressSanitizer and UBSan.
    """
    try:
        import atheris  # noqa: F401
    except ImportError:
        raise ClsoError("atheris is not installed; `pip install -e '.[dev]'` installs it (Linux)") from None
    workdir = Path(workdir)
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = tiny_models()
    for name, data in seeds.items():
        (corpus / f"{name}.crystal").write_bytes(data)
    lib = build_runtime(workdir / "libcrystal.so", cc, "-O1 -g -shared -fPIC")
    env = dict(os.environ, CLSO_FUZZ_LIBRARY=str(lib))
    max_len = max_len or max(len(d) for d in seeds.values()) + 1024
    args = [sys.executable, "-m", "clso.export.fuzz_target", f"-runs={runs}", f"-seed={seed + 1}",
            f"-max_len={max_len}", "-len_control=0", f"-artifact_prefix={workdir}/", "-print_final_stats=1",
            str(corpus)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=workdir)
    log = (done.stdout + done.stderr).strip().splitlines()
    stats = {}
    for line in log:  # libFuzzer's "stat::new_units_added: 12"
        key, _, value = line.removeprefix("stat::").partition(":")
        if line.startswith("stat::") and value.strip().isdigit():
            stats[key] = int(value)
    replay = replay_sanitized(cc, workdir, sorted(corpus.iterdir()))
    crashes = sorted(p.name for p in workdir.glob("crash-*"))
    return {"runs": runs, "seed": seed, "fuzzer_exit_status": done.returncode, "crashes": crashes,
            "seed_files": len(seeds), "corpus_files": len(list(corpus.iterdir())),
            "new_units": stats.get("new_units_added"), "replay": replay,
            "ok": done.returncode == 0 and not crashes and replay["ok"],
            "log_tail": "\n".join(log[-12:])}


def replay_sanitized(cc: str, workdir: Path, files: list[Path]) -> dict:
    """Every file through `crystal check --no-crc`, built with ASan + UBSan where available."""
    flags = sanitizer_flags(cc)
    binary = build_runtime(workdir / "crystal-sanitized", cc, shlex.join(["-O1", "-g", *flags]))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="halt_on_error=1")
    failures, valid = [], 0
    for i in range(0, len(files), 200):
        done = subprocess.run([str(binary), "check", "--no-crc", *map(str, files[i:i + 200])],
                              capture_output=True, text=True, env=env)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode not in (0, 1) or not summary.startswith("{") or "Sanitizer" in done.stderr:
            failures.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        else:
            valid += json.loads(summary)["valid"]
    return {"files": len(files), "valid": valid, "sanitizers": " ".join(flags) or "none", "failures": failures,
            "ok": not failures}
