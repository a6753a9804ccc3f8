"""Stage `library`: M crystalline matrices per weight shape, stored factored in safetensors."""

from pathlib import Path

import torch

from clso import ClsoError
from clso.context import setup
from clso.energy import EnergyMeter
from clso.io import atomic_dir, write_json_atomic
from clso.model.baseline import baseline_tensors
from clso.model.crystalline import LAYER_NAMES
from clso.model.library import BUCKETS, FAMILIES, Library, available_cores, library_metrics, sanity_check
from clso.params import load_params
from clso.progress import progress_bar
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import LIBRARY, Contestant, detail


@stage("library", sections=("base", "model", "library"))
def library(params: Path = PARAMS_OPTION) -> None:
    """Generate the basis library from base.seed: models/library/{library.safetensors,
    manifest.json}, and metrics/detail/library.json with its statistics and the protocol's sanity
    check against the trained baseline's matrices (which also feed the optional svd family). The
    matrices are drawn on the CPU (the same library on every machine); their statistics and the check
    run on base.device. The library's files depend on its params alone, so a new baseline re-runs the
    check but no search."""
    p = load_params(params)
    device = setup(p.base)
    s = p.library
    shares = {f: getattr(s, f"share_{f}") for f in FAMILIES}
    reference = _reference(p.model.n_layer)
    # generating the library is every search's cost; the check is metered apart, charged to no one; saving is
    # not metered (the baseline's own saving is not either)
    with EnergyMeter(**p.base.meter_options(device)) as meter, progress_bar() as bar:
        task = bar.add_task("library", total=4 * s.size, info="")
        lib, tensors = Library.generate(
            p.base.seed, p.model.n_embd, size=s.size, shares=shares, ternary_levels=s.ternary_levels,
            max_rank_fraction=s.max_rank_fraction, reference=reference, progress=lambda: bar.advance(task),
            stats_device=device,
            # a GPU run leaves torch one CPU thread (clso.context.setup): draw on a pool of the cores it leaves
            workers=max(1, available_cores() // torch.get_num_threads()) if device.type == "cuda" else 1)
    ordered = {f"h.{layer}.{LAYER_NAMES[b]}": reference[b][layer] for layer in range(p.model.n_layer) for b in BUCKETS}
    with EnergyMeter(**p.base.meter_options(device)) as check_meter:
        sanity = sanity_check(lib.to(device), ordered, [b for _ in range(p.model.n_layer) for b in BUCKETS])
    with atomic_dir(LIBRARY) as tmp:
        lib.save(tmp, tensors)
    figures = library_metrics(lib, LIBRARY / Library.TENSORS)
    # generating it is a shared cost: every search of the library is charged it (no FLOPs worth counting)
    write_json_atomic(detail("library"), {**figures, "sanity_check": sanity,
                                          "sanity_check_cost": check_meter.reading.as_metrics(),
                                          "generation": {**meter.reading.as_metrics(), "flops": 0}})
    print(f"library: {s.size} matrices × {len(lib.shapes)} buckets, "
          f"{figures['file_bytes']:,} bytes ({figures['bytes_vs_dense']:.1%} of dense) → {LIBRARY}")


def _reference(n_layer: int) -> dict:
    """The trained baseline's matrices by bucket, one per layer (Conv1D layout, d_in × d_out)."""
    folder = Contestant("baseline").model_dir
    state = baseline_tensors(folder)
    try:
        return {b: [state[f"transformer.h.{layer}.{LAYER_NAMES[b]}.weight"] for layer in range(n_layer)]
                for b in BUCKETS}
    except KeyError as e:
        raise ClsoError(f"{folder}: not a baseline of this model.n_layer (no {e}); run `dvc repro -f baseline`") from None


if __name__ == "__main__":
    run_alone("library")
