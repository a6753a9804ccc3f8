"""Stage `library`: M crystalline matrices per weight shape, stored factored in safetensors."""

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from clso import ClsoError
from clso.context import setup
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_json_atomic
from clso.model.crystalline import LAYER_NAMES
from clso.model.library import BUCKETS, FAMILIES, Library, available_cores, library_metrics, sanity_check
from clso.params import load_params
from clso.progress import progress_bar
from stages.common import PARAMS_OPTION, run_alone, stage

OUT_DIR = Path("models/library")
REFERENCE = Path("models/baseline/model.safetensors")
METRICS = Path("metrics/library.json")


@stage("library", sections=("base", "model", "library"))
def library(params: Path = PARAMS_OPTION) -> None:
    """Generate the basis library from base.seed: models/library/{library.safetensors,
    manifest.json} and metrics/library.json, with the protocol's sanity check against the trained
    baseline's matrices (which also feed the optional svd family). The matrices are drawn on the
    CPU (the same library on every machine); their statistics and the check run on base.device."""
    p = load_params(params)
    device = setup(p.base)
    cfg = p.library
    shares = {f: getattr(cfg, f"share_{f}") for f in FAMILIES}
    reference = _reference(p.model.n_layer)
    # metered: generating the library, CLSO's cost; not the diagnostic check, nor saving (the
    # baseline's own saving is not metered either)
    with EnergyMeter(device, cpu_watts_per_core=p.base.cpu_watts_per_core, gpu_watts=p.base.gpu_watts) as meter, \
            progress_bar() as bar:
        task = bar.add_task("library", total=4 * cfg.size, info="")
        lib, tensors = Library.generate(
            p.base.seed, p.model.n_embd, size=cfg.size, shares=shares, ternary_levels=cfg.ternary_levels,
            max_rank_fraction=cfg.max_rank_fraction, reference=reference, progress=lambda: bar.advance(task),
            stats_device=device,
            # a GPU run leaves torch one CPU thread (clso.context.setup): draw on a pool of the cores it leaves
            workers=max(1, available_cores() // torch.get_num_threads()) if device.type == "cuda" else 1)
    ordered = {f"h.{layer}.{LAYER_NAMES[b]}": reference[b][layer] for layer in range(p.model.n_layer) for b in BUCKETS}
    sanity = sanity_check(lib.to(device), ordered, [b for _ in range(p.model.n_layer) for b in BUCKETS])
    with atomic_dir(OUT_DIR) as tmp:
        lib.save(tmp, tensors)
        write_json_atomic(tmp / "sanity.json", sanity)  # per matrix: detail, not a metric to compare
    metrics = library_metrics(lib, OUT_DIR / "library.safetensors")
    metrics["sanity_check"] = {k: v for k, v in sanity.items() if k != "matrices"}
    write_json_atomic(METRICS, {**metrics, **meter.reading.as_metrics()})
    print(f"library: {cfg.size} matrices × {len(lib.shapes)} buckets, "
          f"{metrics['file_bytes']:,} bytes ({metrics['bytes_vs_dense']:.1%} of dense) → {OUT_DIR}")


def _reference(n_layer: int) -> dict:
    """The trained baseline's matrices by bucket, one per layer (Conv1D layout, d_in × d_out)."""
    try:
        state = load_file(str(REFERENCE))
        return {b: [state[f"transformer.h.{layer}.{LAYER_NAMES[b]}.weight"] for layer in range(n_layer)]
                for b in BUCKETS}
    except FileNotFoundError:
        raise ClsoError(f"{REFERENCE}: not found; the library is checked against the trained baseline: "
                        "run `dvc repro baseline` first") from None
    except (SafetensorError, OSError, KeyError) as e:
        raise ClsoError(f"{REFERENCE}: not a baseline of this model.n_layer ({type(e).__name__}); "
                        "run `dvc repro -f baseline`") from None


if __name__ == "__main__":
    run_alone("library")
