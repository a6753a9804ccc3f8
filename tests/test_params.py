"""The strict params loader: every bad params.yaml gives one line, exit code 2, and no outputs."""

import dataclasses
import subprocess
import sys
from dataclasses import asdict

import pytest
import yaml

from clso import ParamsError
from clso.params import SECTIONS, Params, defaults, load_params, parse_params
from tests.conftest import REPO


def good() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_load_and_match_documented_defaults():
    p = load_params(REPO / "params.yaml")
    assert p == Params(**{name: defaults(cls) for name, cls in SECTIONS.items()})


def test_tiny_params_load():
    assert load_params(REPO / "tests/params_tiny.yaml").model.n_embd == 32


def test_int_is_accepted_where_a_float_is_expected():
    raw = good()
    raw["base"]["cpu_watts_per_core"] = 12
    assert parse_params(raw).base.cpu_watts_per_core == 12.0


def _edit(change):
    def make():
        raw = good()
        change(raw)
        return yaml.safe_dump(raw)
    return make


BAD = {
    "misspelled key": (_edit(lambda r: r["prepare"].update(vocab_sise=r["prepare"].pop("vocab_size"))),
                       ["prepare.vocab_sise", "unknown key", "did you mean 'vocab_size'"]),
    "missing key": (_edit(lambda r: r["prepare"].pop("tokenizer")), ["prepare.tokenizer", "missing key"]),
    "string for int": (_edit(lambda r: r["prepare"].update(vocab_size="abc")),
                       ["prepare.vocab_size", "expected an integer", "'abc'"]),
    "bool for int": (_edit(lambda r: r["prepare"].update(vocab_size=True)),
                     ["prepare.vocab_size", "expected an integer"]),
    "float for int": (_edit(lambda r: r["base"].update(threads=1.5)), ["base.threads", "expected an integer"]),
    "int below range": (_edit(lambda r: r["prepare"].update(vocab_size=100)),
                        ["prepare.vocab_size", "too small", "from 257 to 1000000"]),
    "negative seed": (_edit(lambda r: r["base"].update(seed=-1)), ["base.seed", "too small"]),
    "bad choice": (_edit(lambda r: r["prepare"].update(tokenizer="wordpiece")),
                   ["prepare.tokenizer", "one of bpe, gpt2, char"]),
    "device typo": (_edit(lambda r: r["base"].update(device="gpu")), ["base.device", "one of auto, cpu, cuda"]),
    "exclusive minimum": (_edit(lambda r: r["prepare"].update(val_fraction=0)),
                          ["prepare.val_fraction", "too small", "above 0.0"]),
    "not a finite number": (_edit(lambda r: r["prepare"].update(test_fraction=float("nan"))),
                            ["prepare.test_fraction", "not a finite number"]),
    "bad corpus": (_edit(lambda r: r["prepare"].update(corpus="wikitext-3")),
                   ["prepare.corpus", "text:PATH"]),
    "fractions leave no train": (_edit(lambda r: r["prepare"].update(val_fraction=0.4, test_fraction=0.4)),
                                 ["val_fraction + prepare.test_fraction", "at most 0.6"]),
    "unknown section": (_edit(lambda r: r.update(prepar=r.pop("prepare"))),
                        ["prepar", "unknown section", "did you mean 'prepare'"]),
    "missing section": (_edit(lambda r: r.pop("base")), ["base", "missing section"]),
    "section not a mapping": (_edit(lambda r: r.update(prepare=5)), ["prepare", "expected a mapping"]),
    "heads do not divide width": (_edit(lambda r: r["model"].update(n_head=3)),
                                  ["model.n_head", "does not divide"]),
    "shares do not sum to one": (_edit(lambda r: r["library"].update(share_block_diag=0.5)),
                                 ["library.share_*", "sum of 1"]),
    "bad decode_errors": (_edit(lambda r: r["prepare"].update(decode_errors="ignore")),
                          ["prepare.decode_errors", "not a valid choice", "one of strict, replace, skip"]),
    "int choice": (_edit(lambda r: r["library"].update(ternary_levels=4)),
                   ["library.ternary_levels", "one of 3, 5"]),
    "seeds not a list": (_edit(lambda r: r["grid"].update(seeds=1337)), ["grid.seeds", "expected a list", "integer"]),
    "no seeds": (_edit(lambda r: r["grid"].update(seeds=[])), ["grid.seeds", "0 items", "at least 1"]),
    "a seed twice": (_edit(lambda r: r["grid"].update(seeds=[1, 1])), ["grid.seeds", "repeats an item"]),
    "a string seed": (_edit(lambda r: r["grid"].update(seeds=[1, "two"])), ["grid.seeds", "expected an integer", "'two'"]),
    "a bad mode": (_edit(lambda r: r["grid"].update(random=["pure", "hybird"])),
                   ["grid.random", "'hybird' is not a valid choice", "did you mean 'hybrid'"]),
    "fixed body in pure mode": (_edit(lambda r: r["grid"].update(fixed_body=["pure"])), ["grid.fixed_body", "one of hybrid"]),
    "a control without its CLSO run": (_edit(lambda r: r["grid"].update(evolve=["pure"])),
                                       ["grid.random: hybrid is not in grid.evolve", "add hybrid to grid.evolve"]),
    "transferring a mode the grid skips": (_edit(lambda r: r["grid"].update(evolve=["pure"], random=["pure"],
                                                                            no_surrogate=["pure"], fixed_body=[],
                                                                            ngopt=["pure"], head_only=[], es=["pure"],
                                                                            mezo=[])),
                                           ["transfer.clso_mode: hybrid is not in grid.evolve"]),
    "micro-batches that do not divide the batch": (_edit(lambda r: r["baseline"].update(batch_size=16, micro_batch_size=5)),
                                                   ["baseline.micro_batch_size: 5 does not divide", "0 or a divisor"]),
    "CUDA graphs with micro-batches": (_edit(lambda r: r["baseline"].update(batch_size=16, micro_batch_size=4,
                                                                          torch_compile="reduce-overhead")),
                                       ["baseline.torch_compile: reduce-overhead records CUDA graphs"]),
    "a yaml bool for a compile mode": (_edit(lambda r: r["baseline"].update(torch_compile=False)),
                                       ["baseline.torch_compile", "expected a string", "none, default"]),
    "fp16 is no precision": (_edit(lambda r: r["fitness"].update(precision="fp16")),
                             ["fitness.precision", "one of auto, fp32, bf16"]),
    "top level a list": (lambda: "- base\n- prepare\n", ["top level"]),
    "yaml syntax": (lambda: "base:\n  seed: [1, 2\nprepare: {}\n", ["YAML syntax error", "line"]),
    "empty file": (lambda: "", ["top level"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_are_one_line_errors(case, tmp_path):
    make, expected = BAD[case]
    path = tmp_path / "params.yaml"
    path.write_text(make())
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message
    for piece in expected:
        assert piece in message, f"{piece!r} not in {message!r}"


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(ParamsError, match="file not found; run from the repository root"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("case", ["misspelled key", "bad choice", "yaml syntax", "missing section"])
def test_stage_exits_2_with_one_line_and_writes_nothing(case, tmp_path, stage_env):
    make, expected = BAD[case]
    (tmp_path / "params.yaml").write_text(make())
    run = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=stage_env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("clso prepare: error: params.yaml: ")
    assert expected[0] in lines[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_every_field_has_help_and_a_valid_default():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert len(f.metadata["help"]) > 10, f"{cls.__name__}.{f.name} has no help"
    # the defaults themselves must pass the checks the loader applies
    raw = {name: asdict(defaults(cls)) for name, cls in SECTIONS.items()}
    assert parse_params(raw) == Params(**{name: defaults(cls) for name, cls in SECTIONS.items()})


def test_protocol_gpu_profile_loads_at_gpt2_small_scale():
    p = load_params(REPO / "params-protocol-gpu.yaml")
    assert (p.model.n_layer, p.model.n_embd, p.model.n_head) == (12, 768, 12)
    assert (p.library.size, p.evolve.population, p.evolve.generations) == (512, 256, 1000)
    assert p.prepare.corpus == "wikitext-103" and p.prepare.tokenizer == "gpt2"


def test_the_offline_gpu_profile_is_gpt2_small_on_the_shipped_corpus():
    p = load_params(REPO / "params-gpu.yaml")
    protocol = load_params(REPO / "params-protocol-gpu.yaml")
    assert (p.model, p.library, p.fitness) == (protocol.model, protocol.library, protocol.fitness)
    assert p.prepare.corpus == "shakespeare" and p.prepare.tokenizer == "bpe"  # offline: no hub needed
    assert p.base.device == "cuda" and p.baseline.precision == "auto" and p.baseline.torch_compile == "auto"
    assert (p.evolve.population, p.evolve.generations) == (256, 200)


def test_the_docs_show_the_error_the_loader_gives(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    from clso import ParamsError
    from clso.params import load_params

    root = Path(__file__).resolve().parent.parent
    shown = next(line for line in (root / "docs/architecture.md").read_text().splitlines() if "vocab_sise" in line)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["prepare"]["vocab_sise"] = raw["prepare"].pop("vocab_size")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as error:
        load_params("params.yaml")
    assert shown == f"clso prepare: error: {error.value}"


def test_the_arena_step_sizes_are_the_committed_sweeps_best():
    """params.yaml's es and mezo step sizes come from stage sweep (frozen, on the train split), by hand:
    this keeps the two equal."""
    import json

    sweep = json.loads((REPO / "metrics/detail/sweep.json").read_text())
    params = load_params(REPO / "params.yaml")
    for method in ("es", "mezo"):
        section = getattr(params, method)
        assert (section.sigma, section.lr) == (sweep["best"][method]["sigma"], sweep["best"][method]["lr"]), method
