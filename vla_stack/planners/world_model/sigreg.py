"""SIGReg (LeJEPA / LeWorldModel): a sketched isotropic-Gaussian regulariser for embeddings.

Project the batch of embeddings onto random unit directions; each 1-D projection should look like N(0, 1).
The Epps-Pulley statistic compares the empirical characteristic function of a projection with the standard
normal's, exp(-t^2/2), on a grid of t (weighted by exp(-t^2/2), trapezoid rule):

    EP = n * integral |phi_n(t) - exp(-t^2/2)|^2 w(t) dt,     phi_n(t) = mean_j exp(i t x_j)

Averaged over the directions. A collapsed embedding (all points equal, or all on a line) has projections far
from N(0, 1) along most directions, so the statistic is large; an isotropic Gaussian one scores ~O(1).
New directions are drawn every call (from `generator`, so training is reproducible)."""

from __future__ import annotations

import torch


def epps_pulley(x: torch.Tensor, t_max: float = 3.0, knots: int = 17) -> torch.Tensor:
    """x (N, P): N samples of P 1-D projections -> (P,) Epps-Pulley statistics against N(0, 1).
    The characteristic function is even in t for the target and the integrand, so [0, t_max] is doubled."""
    n = x.shape[0]
    t = torch.linspace(0.0, t_max, knots, device=x.device, dtype=x.dtype)
    xt = x[..., None] * t  # (N, P, T)
    real, imag = xt.cos().mean(0), xt.sin().mean(0)  # (P, T)
    gauss = torch.exp(-0.5 * t * t)
    err = (real - gauss).square() + imag.square()
    return 2.0 * n * torch.trapezoid(err * gauss, t, dim=-1)


def sigreg(z: torch.Tensor, num_projections: int = 128, generator: torch.Generator | None = None,
           t_max: float = 3.0, knots: int = 17) -> torch.Tensor:
    """z (N, D) embeddings -> scalar SIGReg loss (mean Epps-Pulley statistic over random unit directions)."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"sigreg needs (N >= 2, D) embeddings, got {tuple(z.shape)}")
    directions = torch.randn(z.shape[1], num_projections, generator=generator).to(z.device, z.dtype)
    directions = directions / directions.norm(dim=0, keepdim=True)
    return epps_pulley(z @ directions, t_max, knots).mean()


def effective_rank(z: torch.Tensor, threshold: float = 0.01) -> dict:
    """Collapse check: eigenvalues of the embedding covariance. `rank` counts eigenvalues above `threshold`
    times the largest; `entropy_rank` is exp(entropy of the normalised spectrum) (Roy & Vetterli)."""
    z = z.double() - z.double().mean(0)
    eig = torch.linalg.eigvalsh(z.T @ z / max(z.shape[0] - 1, 1)).clamp_min(0).flip(0)
    total = eig.sum().item()
    if total <= 0:
        return {"rank": 0, "entropy_rank": 0.0, "dim": z.shape[1], "top_eigenvalues": eig[:5].tolist(), "trace": 0.0}
    p = eig / eig.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"rank": int((eig > threshold * eig[0]).sum().item()), "entropy_rank": round(float(torch.tensor(entropy).exp()), 2),
            "dim": z.shape[1], "top_eigenvalues": [round(v, 5) for v in eig[:5].tolist()], "trace": round(total, 5)}
