"""The best loss any body can reach when the LM head and the final LayerNorm are frozen.

In `pure` mode nothing continuous trains: the logits are W·LN(h), with W the head (the tied
embedding, at its seeded N(0, 0.02) initialisation) and LN the final LayerNorm at γ = 1, β = 0.
Whatever the body, LN's output is γ⊙n + β with n in the zero-mean subspace and ‖n‖² < d
(‖n‖² = d·σ²/(σ² + ε)). A body that knew each position's target y could at best reach

    ℓ*(y) = min over that set of  logsumexp(W z) − (W z)_y,   z = γ⊙n + β,

and the mean of ℓ*(y) over a split's targets bounds from below the loss of every body on that
split. Each ℓ*(y) is a convex problem (log-sum-exp of an affine map less a linear term, over a
ball in a subspace), solved by projected gradient descent; what is reported is not the last
iterate but a certified lower value f(n) + min_m ∇f(n)·(m − n) (the Frank–Wolfe bound, closed
form over a ball), so the figure is a true bound even where the solver has not fully converged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TARGETS_PER_CHUNK = 512
GAP_TOLERANCE = 1e-4  # nats: stop once every target's best value is this close to its certified bound
MAX_STEPS = 200


def _project(n: torch.Tensor, radius: float) -> torch.Tensor:
    """Onto the zero-mean subspace, then into the ball of `radius` (their intersection)."""
    n = n - n.mean(-1, keepdim=True)
    norm = n.norm(dim=-1, keepdim=True)
    return n * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)


@torch.no_grad()
def _chunk_bound(head: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Certified lower value and best value found of ℓ*(y) for each y in `targets`, and the steps taken."""
    d = head.shape[1]
    radius = math.sqrt(d)
    w = head * gamma  # logits = w n + head β
    offset = head @ beta
    lipschitz = 0.5 * float(torch.linalg.matrix_norm(w, ord=2)) ** 2  # the softmax Hessian is ≼ I/2
    step = 1.0 / max(lipschitz, 1e-12)
    rows = torch.arange(len(targets), device=head.device)

    def value_and_grad(n):
        logits = n @ w.t() + offset
        p = torch.softmax(logits, -1)
        value = torch.logsumexp(logits, -1) - logits[rows, targets]
        p[rows, targets] -= 1.0
        return value, p @ w

    n = w[targets] - w[targets].mean(-1, keepdim=True)  # start on the sphere, aligned with the target's row
    n = n * (radius / n.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    lower = torch.full((len(targets),), -math.inf, dtype=head.dtype, device=head.device)
    best = torch.full_like(lower, math.inf)
    for steps in range(1, MAX_STEPS + 1):
        value, grad = value_and_grad(n)
        centred = grad - grad.mean(-1, keepdim=True)
        lower = torch.maximum(lower, value - (grad * n).sum(-1) - radius * centred.norm(dim=-1))
        best = torch.minimum(best, value)
        if float((best - lower).max()) < GAP_TOLERANCE:
            break
        n = _project(n - step * grad, radius)
    return lower, best, steps


def frozen_head_bound(head: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, targets: np.ndarray) -> dict:
    """The lower bound on the mean loss over `targets` (token ids of a split's next tokens).

    head: (V, d) LM-head rows; ln_weight, ln_bias: the final LayerNorm's γ and β. Computed in
    float64 on head's device, for each distinct target once.
    """
    head, gamma, beta = (t.detach().double() for t in (head, ln_weight, ln_bias))
    ids, counts = np.unique(np.asarray(targets, dtype=np.int64), return_counts=True)
    lower, best = torch.empty(len(ids), dtype=torch.float64), torch.empty(len(ids), dtype=torch.float64)
    steps = 0
    for i in range(0, len(ids), TARGETS_PER_CHUNK):
        chunk = torch.from_numpy(ids[i:i + TARGETS_PER_CHUNK]).to(head.device)
        lo, hi, taken = _chunk_bound(head, gamma, beta, chunk)
        lower[i:i + len(chunk)], best[i:i + len(chunk)] = lo.cpu(), hi.cpu()
        steps = max(steps, taken)
    weights = torch.from_numpy(counts / counts.sum())
    loss = float((weights * lower).sum())
    return {"loss": loss, "ppl": math.exp(loss), "solver_gap": float((weights * (best - lower)).sum()),
            "distinct_targets": len(ids), "solver_steps": steps}
