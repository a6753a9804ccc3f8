"""A contestant's record: everything the frontier needs to know of one trained model, written by the
stage that trained it. The baseline, the neuron-field LM and every search variant write one; `compare`
reads them all alike.

A record holds the contestant's own costs (what its stage metered and counted) and names the shared
costs it is also charged (`charged_with`: the library's generation, the surrogate's pretraining, …),
which other stages record once. `clso.compare.charged` adds them up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clso import ClsoError
from clso.io import read_json, write_json_atomic

KINDS = ("baseline", "clso", "control", "contestant")  # the reference; CLSO's search; its controls; anyone else
VERSION = 1


@dataclass(frozen=True)
class Record:
    name: str  # the one name it has everywhere: `baseline`, `field`, `evolve@pure-1337`
    kind: str  # one of KINDS
    label: str  # how tables and legends call it
    val_loss: float  # nats per token on the whole val split, fp32
    test_loss: float  # the same on the test split, scored once training is done
    # what its own stage spent, by part: energy_wh, method, wall_s, cpu_s and FLOPs (and, when a GPU
    # worked, cpu_wh, cpu_method, gpu_wh, gpu_method)
    costs: dict[str, dict]
    # its loss as training went: which loss (`loss`), and points of `loss`, `energy_wh`, `flops`,
    # `wall_s` and `step`, on its own costs (the shared ones come before)
    curve: dict
    charged_with: tuple[str, ...] = ()  # the shared costs it is charged besides its own
    mode: str | None = None  # pure or hybrid, for a search of the crystalline GPT-2
    seed: int | None = None
    details: dict = field(default_factory=dict)  # the stage's other figures
    # what its stage metered but charges to no one (measuring is no one's training), by what it was:
    # final_scores, curve_val_loss, checkpoints
    uncharged: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def flops_with(self, shared: dict[str, dict]) -> int:
        """Its own FLOPs and those of the shared costs it names, as clso.compare.charged adds them."""
        return sum(c.get("flops", 0) for c in self.costs.values()) + sum(shared[n].get("flops", 0)
                                                                          for n in self.charged_with)

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)

    @property
    def test_ppl(self) -> float:
        return math.exp(self.test_loss)

    def save(self, path: str | Path) -> None:
        record = asdict(self)
        record |= {"val_ppl": self.val_ppl, "test_ppl": self.test_ppl, "charged_with": list(self.charged_with)}
        write_json_atomic(path, {"version": VERSION, **record})

    @classmethod
    def load(cls, path: str | Path) -> Record:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            found = data.get("version") if isinstance(data, dict) else "none"
            raise ClsoError(f"{path}: record version {found}, expected {VERSION}; re-create it with `dvc repro -f` "
                            "of its stage")
        try:
            return cls(**{k: v for k, v in data.items() if k not in ("version", "val_ppl", "test_ppl")}
                       | {"charged_with": tuple(data["charged_with"])})
        except (KeyError, TypeError, ValueError) as e:
            raise ClsoError(f"{path}: not a contestant record ({type(e).__name__}: {e}); re-create it with "
                            "`dvc repro -f` of its stage") from None


def curve_points(rows: list[dict], loss: str, step: str) -> list[dict]:
    """A stage's curve rows as record points: those with a `loss`, each with its costs and step. Energy and
    time are rounded as a stage's cost is (EnergyReading.as_metrics), so the curve ends where its charge does."""
    return [{"loss": r[loss], "energy_wh": round(r["energy_wh"], 6), "flops": r["flops"],
             "wall_s": round(r["wall_s"], 6), "step": r[step]}
            for r in rows if r[loss] is not None and r[loss] == r[loss]]


# what a cost is: energy with its method (and parts by device, when a GPU worked), time, FLOPs, and
# for a search the genomes it truly evaluated (what random search is matched on)
COST_KEYS = ("energy_wh", "method", "wall_s", "cpu_s", "cpu_wh", "cpu_method", "gpu_wh", "gpu_method", "flops",
             "true_evaluations")


def split_cost(figures: dict) -> tuple[dict, dict]:
    """A stage's figures as (its cost: COST_KEYS, the rest)."""
    return ({k: figures[k] for k in COST_KEYS if k in figures},
            {k: v for k, v in figures.items() if k not in COST_KEYS})
