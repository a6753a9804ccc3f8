"""The surrogate: a small network that ranks genomes without running the GPT-2.

Each gene is described by a learned embedding of its (bucket, library index), by fixed features
of the matrix it picks (family, rank, density, bits, FLOPs: `clso.model.library.structure_features`),
or by both (`inputs`); the descriptions, concatenated in genome order, feed an MLP that scores the
genome (lower = better, on the scale of standardised log-loss). A few hundred genomes cannot teach
an embedding for each of thousands of (gene, index) pairs; structure features are shared by every
matrix alike. It is trained with a pairwise ranking loss (RankNet or margin), optionally plus MSE
on the standardised log-loss, because the search only needs to know which genome is better. An
ensemble of K members gives a spread that reads as uncertainty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clso import ClsoError
from clso.context import to_device
from clso.io import read_json, read_tensors, write_json_atomic

RANKING_LOSSES = ("ranknet", "margin")
INPUTS = ("index", "structure", "both")


@dataclass(frozen=True)
class SurrogateConfig:
    gene_buckets: tuple[int, ...]  # bucket number of each gene, in genome order
    library_size: int
    inputs: str = "index"  # index embedding, structure features, or both
    n_features: int = 0  # structure features per gene
    embed_dim: int = 16
    hidden: int = 64
    depth: int = 2
    ensemble: int = 1
    ranking: str = "ranknet"
    margin: float = 0.1
    mse_weight: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-4
    steps: int = 300
    batch_size: int = 128

    def __post_init__(self):
        if self.ranking not in RANKING_LOSSES:
            raise ValueError(f"ranking must be one of {RANKING_LOSSES}")
        if self.inputs not in INPUTS or (self.inputs != "index") != (self.n_features > 0):
            raise ValueError(f"inputs must be one of {INPUTS}, with n_features > 0 exactly when structure is used")

    @property
    def embeds(self) -> bool:
        return self.inputs in ("index", "both")


class SurrogateNet(nn.Module):
    def __init__(self, config: SurrogateConfig):
        super().__init__()
        n_buckets = max(config.gene_buckets) + 1
        self.embedding = nn.Embedding(n_buckets * config.library_size, config.embed_dim) if config.embeds else None
        self.register_buffer("features", torch.zeros(n_buckets * config.library_size, config.n_features))
        self.register_buffer("offsets", torch.tensor(config.gene_buckets) * config.library_size, persistent=False)
        per_gene = (config.embed_dim if config.embeds else 0) + config.n_features
        layers, width = [], len(config.gene_buckets) * per_gene
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.ReLU()]
            width = config.hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, genomes: torch.Tensor) -> torch.Tensor:
        rows = genomes + self.offsets
        parts = ([self.embedding(rows)] if self.embedding is not None else []) + [self.features[rows]]
        return self.mlp(torch.cat(parts, -1).flatten(1)).squeeze(1)


class Surrogate:
    def __init__(self, config: SurrogateConfig, seed: int = 0, features: torch.Tensor | None = None, device="cpu"):
        """`features`: (buckets, M, n_features) structure features, used unless inputs is index
        (a loaded state brings its own). Members are initialised on the CPU, the same on every
        machine, then trained and queried on `device`."""
        self.config, self.device = config, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.members = [SurrogateNet(config) for _ in range(config.ensemble)]
        if features is not None and config.n_features:
            for m in self.members:
                m.features.copy_(features.reshape(m.features.shape))
        self.members = [m.to(self.device) for m in self.members]
        self.target_mean, self.target_std = 0.0, 1.0

    def fit(self, genomes, losses, seed: int = 0, steps: int | None = None) -> float:
        """Train every member on (genome, true loss) pairs; returns the final training loss.

        Unfit genomes (infinite loss) are ranked below every fit one by a large target.
        """
        config = self.config
        g = torch.as_tensor(np.asarray(genomes), dtype=torch.long).to(self.device)
        log_loss = np.log(np.asarray(losses, dtype=np.float64))
        finite = np.isfinite(log_loss)
        if not finite.any():
            raise ValueError("no finite losses to train the surrogate on")
        self.target_mean, self.target_std = float(log_loss[finite].mean()), float(log_loss[finite].std() or 1.0)
        z = (log_loss - self.target_mean) / self.target_std
        z[~finite] = z[finite].max() + 3.0
        target = torch.as_tensor(z, dtype=torch.float32).to(self.device)
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same batches on every device
        last = None
        for member in self.members:
            opt = torch.optim.AdamW(member.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            member.train()
            for _ in range(steps or config.steps):
                idx = to_device(torch.randint(0, len(g), (min(config.batch_size, len(g)),), generator=generator),
                                self.device)
                score = member(g[idx])
                loss = self._ranking_loss(score, target[idx]) + config.mse_weight * F.mse_loss(score, target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = loss.detach()
            member.eval()
        return float(last)

    def _ranking_loss(self, score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Over all ordered pairs in the batch whose true losses differ."""
        diff_true = target[:, None] - target[None, :]
        diff_pred = score[:, None] - score[None, :]
        sign = torch.sign(diff_true)
        mask = sign != 0
        if not mask.any():
            return score.sum() * 0
        if self.config.ranking == "ranknet":
            return F.binary_cross_entropy_with_logits(diff_pred[mask], (sign[mask] > 0).float())
        return F.relu(self.config.margin - sign[mask] * diff_pred[mask]).mean()

    @torch.no_grad()
    def predict(self, genomes) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of the members' scores (standardised log-loss; lower is better)."""
        g = torch.as_tensor(np.asarray(genomes), dtype=torch.long).to(self.device)
        scores = torch.stack([m(g) for m in self.members]).double().cpu().numpy()
        return scores.mean(0), scores.std(0)

    def to_loss(self, score: np.ndarray) -> np.ndarray:
        """A score mapped back to a loss (meaningful only as far as the MSE term trained it)."""
        return np.exp(score * self.target_std + self.target_mean)

    def _layer_flops(self) -> list[int]:
        """Matmul FLOPs of each MLP layer of one member on one genome (embeddings are lookups)."""
        return [2 * m.in_features * m.out_features for m in self.members[0].mlp if isinstance(m, nn.Linear)]

    def _mlp_flops(self) -> int:
        return sum(self._layer_flops())

    def inference_flops(self, n_genomes: int) -> int:
        """FLOPs of `predict` on n genomes: every member scores every genome."""
        return self._mlp_flops() * n_genomes * len(self.members)

    def training_flops(self, n_samples: int, steps: int | None = None) -> int:
        """FLOPs of `fit` on n samples: per step a batch forward (1×) and backward (weight gradients
        1×, input gradients 1× but for the first layer when no embedding below it trains)."""
        batch = min(self.config.batch_size, n_samples)
        layers = self._layer_flops()
        per_sample = 2 * sum(layers) + sum(layers[0 if self.config.embeds else 1:])
        return per_sample * batch * (steps or self.config.steps) * len(self.members)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"member{i}.{k}": v.cpu() for i, m in enumerate(self.members) for k, v in m.state_dict().items()}
        state["target"] = torch.tensor([self.target_mean, self.target_std], dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, m in enumerate(self.members):
            prefix = f"member{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.target_mean, self.target_std = (float(v) for v in state["target"])

    # --- the folder a trained surrogate lives in (models/surrogate) ------------------------------

    WEIGHTS = "surrogate.safetensors"

    def save(self, folder: str | Path, genomes: np.ndarray, losses: np.ndarray, holdout: np.ndarray) -> None:
        """surrogate.safetensors (its weights), surrogate.json (its config) and data.json (the genomes it
        learnt from, their true losses and which were held out), into an existing folder."""
        folder = Path(folder)
        save_file(self.state_dict(), str(folder / self.WEIGHTS), metadata={"clso": "surrogate/1"})
        write_json_atomic(folder / "surrogate.json", dataclasses.asdict(self.config))
        write_json_atomic(folder / "data.json", {"genomes": genomes.tolist(),
                                                 "losses": [float(x) if np.isfinite(x) else "inf" for x in losses],
                                                 "holdout": sorted(holdout.tolist())})

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> tuple[Surrogate, np.ndarray, np.ndarray]:
        """A saved surrogate on `device`, with the genomes and true losses it learnt from."""
        folder, fix = Path(folder), "run `dvc repro surrogate` first"
        config, data = read_json(folder / "surrogate.json", fix), read_json(folder / "data.json", fix)
        state = read_tensors(folder / cls.WEIGHTS, fix)
        try:
            model = cls(SurrogateConfig(**{**config, "gene_buckets": tuple(config["gene_buckets"])}), device=device)
            model.load_state_dict(state)
            genomes = np.array(data["genomes"], dtype=np.int64)
            losses = np.array([float(x) for x in data["losses"]])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ClsoError(f"{folder}: unreadable surrogate ({type(e).__name__}); re-create it with "
                            "`dvc repro -f surrogate`") from None
        return model, genomes, losses


# --- how well a score ranks the truth ---------------------------------------------------------

def ranking_metrics(predicted, true) -> dict:
    return {"spearman": round(spearman(predicted, true), 4), "kendall_tau": round(kendall_tau(predicted, true), 4),
            "top10_recall": round(top_recall(predicted, true, 0.1), 4)}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom else 0.0


def kendall_tau(a, b) -> float:
    """Kendall's tau-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), 1)
    da, db = da[upper], db[upper]
    denom = np.sqrt((da != 0).sum() * (db != 0).sum())
    return float((da * db).sum() / denom) if denom else 0.0


def top_recall(predicted, true, fraction: float = 0.1) -> float:
    """Share of the truly best `fraction` (lowest loss) that the prediction also puts there."""
    k = max(1, int(round(fraction * len(true))))
    best_true = set(np.argsort(true, kind="stable")[:k].tolist())
    best_pred = set(np.argsort(predicted, kind="stable")[:k].tolist())
    return len(best_true & best_pred) / k
