"""Closed-form conditional mean: Nystroem kernel ridge regression, face embedding -> latent.

The hypernetwork models a LoRA latent as ``mean(embedding) + residual``: this module fits
the mean in closed form (an RBF kernel ridge regression on ``m`` landmark embeddings, so the
cost is ``O(n m^2)`` and the stored model is ``m`` landmarks plus an ``m x k`` coefficient
matrix), and the diffusion learns the spread of the residual around it. The kernel width and
ridge are chosen on validation rows (never on test rows); the residuals the diffusion trains
on are *cross-fitted* (each fold predicted by a mean fitted without it), so they have the size
residuals of new people have, not the shrunken in-sample size.

Plain torch (float64 solves); nothing here imports Lightning or diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Kernel widths, as multiples of 1 / (median squared distance between training conditions).
GAMMA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Ridge strengths, relative to the mean diagonal of the landmark Gram matrix.
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class KernelMean:
    """``mean(c) = exp(-gamma |c - landmark|^2) @ coef`` (all tensors float32)."""

    landmarks: Tensor  # (m, C)
    coef: Tensor  # (m, K)
    gamma: float

    def kernel(self, cond: Tensor) -> Tensor:
        d2 = torch.cdist(cond.float(), self.landmarks.to(cond.device).float()).pow(2)
        return torch.exp(-self.gamma * d2)

    def __call__(self, cond: Tensor) -> Tensor:
        return self.kernel(cond) @ self.coef.to(cond.device)


def fit_kernel_mean(cond: Tensor, z: Tensor, val_cond: Tensor | None = None, val_z: Tensor | None = None,
                    n_landmarks: int = 1024, seed: int = 0, folds: int = 5) -> tuple[KernelMean, Tensor, dict]:
    """Fit the conditional mean, choosing ``(gamma, ridge)`` on validation (else by K-fold CV).

    ``cond`` (n, C) and ``z`` (n, K) are the standardized training conditions and latents.
    Returns ``(model, cross_fitted_residuals (n, K), report)``; the model is refitted on all
    training rows with the chosen setting.
    """
    n = len(cond)
    g = torch.Generator().manual_seed(seed)
    m = min(n_landmarks, n)
    land = cond[torch.randperm(n, generator=g)[:m]].float()
    sub = cond[torch.randperm(n, generator=g)[: min(n, 2000)]]
    med = torch.cdist(sub, sub).pow(2).median().clamp_min(1e-12).item()
    fold = torch.randperm(n, generator=g) % folds

    has_val = val_cond is not None and len(val_cond) > 0
    eye = torch.eye(m, dtype=torch.float64)
    scores: dict[str, float] = {}
    best, best_err = None, float("inf")
    for gm in GAMMA_GRID:
        gamma = gm / med
        km = torch.exp(-gamma * torch.cdist(land, land).pow(2)).double() + 1e-8 * eye
        kn = torch.exp(-gamma * torch.cdist(cond, land).pow(2)).double()
        gram, rhs = kn.T @ kn, kn.T @ z.double()
        kv = torch.exp(-gamma * torch.cdist(val_cond, land).pow(2)).double() if has_val else None
        for ridge in RIDGE_GRID:
            if has_val:
                coef = torch.linalg.solve(gram + ridge * n * km, rhs)
                err = (kv @ coef - val_z.double()).pow(2).mean().item()
            else:
                err = 0.0
                for f in range(folds):
                    mask = fold == f
                    kf = kn[mask]
                    coef = torch.linalg.solve(gram - kf.T @ kf + ridge * int((~mask).sum()) * km,
                                              rhs - kf.T @ z[mask].double())
                    err += (kf @ coef - z[mask].double()).pow(2).sum().item()
                err /= z.numel()
            scores[f"{gm:g}/{ridge:g}"] = err
            if err < best_err:
                best, best_err = (gamma, ridge, gm), err
    gamma, ridge, gm = best
    km = torch.exp(-gamma * torch.cdist(land, land).pow(2)).double() + 1e-8 * eye
    kn = torch.exp(-gamma * torch.cdist(cond, land).pow(2)).double()
    gram, rhs = kn.T @ kn, kn.T @ z.double()
    resid = torch.empty_like(z)
    for f in range(folds):  # cross-fitted residuals: each fold predicted by a mean fitted without it
        mask = fold == f
        kf = kn[mask]
        coef = torch.linalg.solve(gram - kf.T @ kf + ridge * int((~mask).sum()) * km, rhs - kf.T @ z[mask].double())
        resid[mask] = z[mask] - (kf @ coef).float()
    model = KernelMean(land, torch.linalg.solve(gram + ridge * n * km, rhs).float(), gamma)
    report = {"gamma_over_median": gm, "ridge": ridge, "landmarks": m,
              "chosen_on": "validation" if val_cond is not None and len(val_cond) else f"{folds}-fold CV",
              "best_mse": best_err, "zero_mse": float(((val_z if val_z is not None and len(val_z) else z)).pow(2).mean())}
    return model, resid, report


__all__ = ["KernelMean", "fit_kernel_mean", "GAMMA_GRID", "RIDGE_GRID"]
