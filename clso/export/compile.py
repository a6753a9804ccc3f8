"""Compile models to .crystal files, build the C runtime, and measure what quantization costs."""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from clso import ClsoError
from clso.export.format import FLAG_TIED, CrystalFormatError
from clso.export.reader import read_crystal
from clso.export.reference import CrystalModel
from clso.model.crystalline import LAYER_NAMES, ModelConfig
from clso.model.library import BUCKETS

RUNTIME_SOURCE = Path(__file__).parent / "runtime" / "crystal.c"
# transformers 5 renamed a model's KV cache from `past_key_values` to `cache`: take the name this one knows
KV_CACHE = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"
# The C runtime and the Python reader compute the same float32 model in different orders, so their
# logits differ by rounding alone (at most 1.2e-5 in the default run). Rounding error grows with the
# values, so the bound scales with the largest logit (never under 1e-3 absolute): ~100x the rounding
# seen, yet far below the shift a misread index, scale or dtype causes.
RUNTIME_LOGIT_TOLERANCE = 1e-3


def build_runtime(out: str | Path, cc: str = "cc", cflags: str = "-O3") -> Path:
    """Compile crystal.c with the system C compiler into `out` (replaced only when it succeeds)."""
    out = Path(out)
    compiler = shutil.which(cc)
    if compiler is None:
        raise ClsoError(f"C compiler {cc!r} not found; install one (gcc or clang) or set compile.cc")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *shlex.split(cflags), "-o", tmp, str(RUNTIME_SOURCE), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise ClsoError(f"compiling the C runtime failed ({first}); check compile.cc and compile.cflags")
    os.replace(tmp, out)
    return out


def run_runtime(binary: str | Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the C runtime; stdout stays bytes (generated text may split a UTF-8 character)."""
    done = subprocess.run([str(binary), *map(str, args)], capture_output=True, timeout=timeout)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise ClsoError(f"crystal {args[0]}: {message}")
    return done


def runtime_logits(binary, path, ids) -> np.ndarray:
    """(T, tokenizer vocab) logits the C runtime prints for token ids (pruned ids are -inf)."""
    out = run_runtime(binary, "logits", path, *[int(i) for i in ids]).stdout.decode()
    return np.array([[float(v) for v in line.split()] for line in out.splitlines()], dtype=np.float64)


def check_runtime_logits(path, c_logits: np.ndarray, python_logits: np.ndarray) -> float:
    """The largest |C − Python| logit difference of one file; a ClsoError beyond the tolerance."""
    finite = np.isfinite(python_logits)
    if c_logits.shape != python_logits.shape or not np.array_equal(finite, np.isfinite(c_logits)):
        raise ClsoError(f"{path}: the C runtime's logits have shape {c_logits.shape} or -inf ids unlike the "
                        f"Python reader's {python_logits.shape}; rebuild the runtime with `dvc repro -f compile`")
    diff = float(np.abs(c_logits[finite] - python_logits[finite]).max())
    tolerance = RUNTIME_LOGIT_TOLERANCE * max(1.0, float(np.abs(python_logits[finite]).max()))
    if not diff <= tolerance:  # NaN included
        raise ClsoError(f"{path}: the C runtime's logits differ from the Python reader's by {diff:.3g}, beyond the "
                        f"tolerance {tolerance:.3g}; drop value-changing flags such as -ffast-math from "
                        f"compile.cflags, else the runtime and clso/export/reader.py disagree on the format")
    return diff


def hf_model(crystal) -> GPT2LMHeadModel:
    """A stock transformers GPT-2 with the file's weights, dequantized and made dense: PyTorch eager.
    Its token ids are the file's rows (the tokenizer's ids unless the vocabulary was pruned)."""
    h = crystal.header
    config = ModelConfig(vocab_size=h["vocab_rows"], n_layer=h["n_layer"], n_embd=h["n_embd"], n_head=h["n_head"],
                         block_size=h["block_size"], tie_embeddings=bool(h["flags"] & FLAG_TIED)).gpt2()
    config.layer_norm_epsilon = float(h["layer_norm_eps"])
    with torch.random.fork_rng(devices=[]):
        model = GPT2LMHeadModel(config).eval()
    ref = CrystalModel(crystal)
    state = {"transformer.wte.weight": ref.wte, "transformer.wpe.weight": ref.wpe,
             "transformer.ln_f.weight": ref.ln_f[0], "transformer.ln_f.bias": ref.ln_f[1]}
    if not h["flags"] & FLAG_TIED:
        state["lm_head.weight"] = ref.head
    for i, block in enumerate(ref.blocks):
        prefix = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            state[f"{prefix}.{ln}.weight"], state[f"{prefix}.{ln}.bias"] = block[ln]
        for bucket in BUCKETS:
            parts, gain, bias = block[bucket]
            eye = torch.eye(h["n_inner"] if bucket == "mlp_proj" else h["n_embd"])
            state[f"{prefix}.{LAYER_NAMES[bucket]}.weight"] = CrystalModel._linear(eye, (parts, gain, torch.zeros_like(bias)))
            state[f"{prefix}.{LAYER_NAMES[bucket]}.bias"] = bias
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight" and ".attn.bias" not in m]:
        raise AssertionError(f"state does not fit GPT-2: {missing}, {unexpected}")
    model.tie_weights()
    return model


@torch.no_grad()
def quantization_reports(float_logits_fn, crystals: dict, tokens: np.ndarray, block_size: int,
                         batch_size: int = 16) -> dict[str, dict]:
    """Each file's model (all of one vocabulary) against the float PyTorch model on consecutive
    windows of `tokens`, in one pass: the loss of both, top-1 agreement, the mean KL divergence
    KL(float ‖ file) of the next-token distributions (top-1 alone says little of a near-uniform
    model, whose flat logits flip their argmax at any rounding; llama.cpp reports both) and the
    largest absolute logit difference. A file with a pruned vocabulary cannot read or predict the ids it dropped:
    windows holding one are left out (and counted), and both softmaxes run over the kept ids."""
    models = {name: CrystalModel(c) for name, c in crystals.items()}
    row_of = next(iter(models.values())).row_of
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ClsoError(f"the val split ({len(tokens)} tokens) holds no window of {block_size}")
    windows = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64)
                        for s in range(0, n_windows * block_size, block_size)])
    usable = windows[(row_of[windows] >= 0).all(axis=1)]
    if not len(usable):
        raise ClsoError("every val window holds a token the pruned vocabulary dropped; set compile.prune_vocab: false")
    kept = torch.from_numpy(row_of >= 0)
    target_of = torch.cumsum(kept.long(), 0) - 1  # tokenizer id → position among the kept ids
    float_sum, count = 0.0, 0
    sums = {name: {"loss": 0.0, "agree": 0.0, "kl": 0.0, "max_diff": 0.0} for name in models}
    for first in range(0, len(usable), batch_size):
        xy = torch.from_numpy(usable[first:first + batch_size])
        x, y = xy[:, :-1], target_of[xy[:, 1:].reshape(-1)]
        ref = float_logits_fn(x).float().flatten(0, 1)
        ref = ref if bool(kept.all()) else ref[:, kept]
        float_sum += float(F.cross_entropy(ref, y, reduction="sum"))
        ref_top = ref.argmax(-1)
        for name, model in models.items():
            got = model(x).flatten(0, 1)
            got = got if bool(kept.all()) else got[:, kept]
            s = sums[name]
            s["loss"] += float(F.cross_entropy(got, y, reduction="sum"))
            s["agree"] += float((got.argmax(-1) == ref_top).sum())
            s["kl"] += _kl_sum(ref, got)
            s["max_diff"] = max(s["max_diff"], float(got.sub_(ref).abs_().max()))
        count += y.numel()
    float_loss = float_sum / count
    reports = {}
    for name, s in sums.items():
        loss = s["loss"] / count
        ppl = math.exp(min(loss, 700.0))
        reports[name] = {"val_tokens": count, "val_windows_used": len(usable), "val_windows": n_windows,
                         "float_val_loss": float_loss, "val_loss": loss, "float_val_ppl": math.exp(float_loss),
                         "val_ppl": ppl, "ppl_change": ppl / math.exp(float_loss) - 1.0,
                         "top1_agreement": s["agree"] / count, "mean_kl": s["kl"] / count,
                         "max_abs_logit_diff": s["max_diff"]}
    return reports


def _kl_sum(ref: torch.Tensor, got: torch.Tensor, rows: int = 1024) -> float:
    """Σ over rows of KL(softmax(ref) ‖ softmax(got)), in float64 (the KL of a good file is tiny) and in
    chunks of rows (a float64 copy of GPT-2's 50257-wide logits for a whole batch would take gigabytes)."""
    total = 0.0
    for i in range(0, len(ref), rows):
        log_p, log_q = F.log_softmax(ref[i:i + rows].double(), -1), F.log_softmax(got[i:i + rows].double(), -1)
        total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
    return total


@torch.no_grad()
def _torch_generate(model: GPT2LMHeadModel, start: int, new_tokens: int, temperature: float, top_k: int,
                    seed: int) -> float:
    """Seconds for one sequence of `new_tokens` with the KV cache, sampled like the C runtime."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[start]])
    began = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    for _ in range(new_tokens):
        logits = out.logits[0, -1] / temperature
        top = torch.topk(logits, min(top_k, len(logits)) if top_k else len(logits))
        choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)]
        out = model(input_ids=choice.view(1, 1), **{KV_CACHE: getattr(out, KV_CACHE)}, use_cache=True)
    return time.perf_counter() - began


def bench_runtime(binary, path, *, new_tokens: int = 100, repeats: int = 3, temperature: float = 0.8,
                  top_k: int = 40, seed: int = 0) -> dict:
    """Single-sequence generation: the C runtime against PyTorch eager (transformers' GPT-2 with the
    file's weights, KV cache), interleaved repeats, medians of the listed per-repeat seconds. The C
    time is the one its --stats reports for its generation loop (after mmap and validation); its wall
    time with process start and load is reported too."""
    try:
        crystal = read_crystal(Path(path).read_bytes())
    except CrystalFormatError as e:
        raise CrystalFormatError(f"{path}: {e}") from None
    h = crystal.header
    new_tokens = min(new_tokens, h["block_size"] - 1)
    if new_tokens < 1:
        raise ClsoError("the model's context holds no generated token")
    model = hf_model(crystal)
    # the runtime's start with an empty prompt: end-of-text if the file keeps it, else row 0
    eot, rows = h["eot_token"], CrystalModel(crystal).row_of
    start = int(rows[eot]) if eot < h["tokenizer_vocab"] and rows[eot] >= 0 else 0
    torch_s, c_s, c_wall = [], [], []
    for r in range(repeats):
        torch_s.append(_torch_generate(model, start, new_tokens, temperature, top_k, seed + r))
        began = time.perf_counter()
        done = run_runtime(binary, "generate", path, "-n", new_tokens, "-t", temperature, "-k", top_k,
                           "-s", seed + r, "--stats")
        c_wall.append(time.perf_counter() - began)
        stats = json.loads(done.stderr.decode().strip().splitlines()[-1])
        if stats["new_tokens"] != new_tokens:
            raise AssertionError(f"runtime made {stats['new_tokens']} tokens, asked {new_tokens}")
        c_s.append(stats["seconds"])
    t, c, w = statistics.median(torch_s), statistics.median(c_s), statistics.median(c_wall)
    return {"file": str(path), "file_bytes": Path(path).stat().st_size, "new_tokens": new_tokens,
            "torch_threads": torch.get_num_threads(), "runtime_threads": 1,
            "torch_tokens_per_s": round(new_tokens / t, 2), "runtime_tokens_per_s": round(new_tokens / c, 2),
            "runtime_tokens_per_s_with_process_start": round(new_tokens / w, 2),
            "ratio": round(t / c, 3), "ratio_with_process_start": round(t / w, 3),
            "torch_s": torch_s, "runtime_s": c_s, "runtime_wall_s": c_wall}


# The crystal journal's quantization claims (document 004), tested on the neuron-field LM. A per-tensor
# int mode "breaks it" when the file's top token differs from the float model's at more than a tenth
# of the positions (the journal's symptom: the top token turned into a newline) or it costs more than
# a tenth in perplexity; "mixed8 = full quality" is judged by the compile stage's mixed8 targets.
BROKEN_PPL_CHANGE = 0.10
BROKEN_TOP1_AGREEMENT = 0.90


def journal_claims(modes: dict, max_kl: float, max_ppl_change: float) -> dict:
    """Document 004's claims on its files, measured on the neuron-field LM's (quantization_reports of
    each mode): mixed8 keeps full quality (mean KL and perplexity change within the bounds);
    per-tensor int8 and int16 (embeddings quantized too) break it."""
    m8 = modes["mixed8"]
    return {"mixed8_full_quality": m8["mean_kl"] <= max_kl and abs(m8["ppl_change"]) <= max_ppl_change,
            "mixed8_ppl_change": m8["ppl_change"], "mixed8_mean_kl": m8["mean_kl"],
            **{f"{mode}_breaks": modes[mode]["ppl_change"] > BROKEN_PPL_CHANGE
               or modes[mode]["top1_agreement"] < BROKEN_TOP1_AGREEMENT for mode in ("int8", "int16")},
            **{f"{mode}_{k}": modes[mode][k] for mode in ("int8", "int16") for k in ("ppl_change", "top1_agreement")},
            "broken_ppl_change": BROKEN_PPL_CHANGE, "broken_top1_agreement": BROKEN_TOP1_AGREEMENT, "max_kl": max_kl,
            "max_ppl_change": max_ppl_change}
