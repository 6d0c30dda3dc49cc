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

from lorasynth.core.delta import energy_scores

#: Kernel widths, as multiples of 1 / (median squared distance between training conditions).
GAMMA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Ridge strengths, relative to the mean diagonal of the landmark Gram matrix.
RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


def make_folds(n: int, folds: int, groups: Tensor | None = None, seed: int = 0) -> Tensor:
    """Fold index of each row; rows of one group (a person's LoRAs) share a fold."""
    g = torch.Generator().manual_seed(seed)
    if groups is None:
        return torch.randperm(n, generator=g) % folds
    uniq, inv = torch.unique(torch.as_tensor(groups), return_inverse=True)
    return (torch.randperm(len(uniq), generator=g) % folds)[inv]


def weighted_mse(pred: Tensor, z: Tensor, weight: Tensor | None) -> float:
    err = (pred.double() - z.double()).pow(2)
    return float((err * weight.double()).sum(1).mean() / weight.double().sum() if weight is not None else err.mean())


def fit_kernel_mean(cond: Tensor, z: Tensor, val_cond: Tensor | None = None, val_z: Tensor | None = None,
                    n_landmarks: int = 1024, seed: int = 0, folds: int = 5, groups: Tensor | None = None,
                    weight: Tensor | None = None) -> tuple[KernelMean, Tensor, dict]:
    """Fit the conditional mean, choosing ``(gamma, ridge)`` on validation (else by K-fold CV).

    ``cond`` (n, C) and ``z`` (n, K) are the standardized training conditions and latents.
    ``groups``: a person id per row (the cross-fitting folds keep a person's LoRAs together);
    ``weight`` (K,): per-dimension weight of the squared error that chooses the setting
    (e.g. the latent variances, so that the error is measured in raw latent units).
    Returns ``(model, cross_fitted_residuals (n, K), report)``; the model is refitted on all
    training rows with the chosen setting.
    """
    n = len(cond)
    g = torch.Generator().manual_seed(seed)
    m = min(n_landmarks, n)
    land = cond[torch.randperm(n, generator=g)[:m]].float()
    sub = cond[torch.randperm(n, generator=g)[: min(n, 2000)]]
    med = torch.cdist(sub, sub).pow(2).median().clamp_min(1e-12).item()
    fold = make_folds(n, folds, groups, seed)

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
                err = weighted_mse(kv @ coef, val_z, weight)
            else:
                err = 0.0
                for f in range(folds):
                    mask = fold == f
                    kf = kn[mask]
                    coef = torch.linalg.solve(gram - kf.T @ kf + ridge * int((~mask).sum()) * km,
                                              rhs - kf.T @ z[mask].double())
                    err += weighted_mse(kf @ coef, z[mask], weight) * int(mask.sum())
                err /= n
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
              "best_mse": best_err,
              "zero_mse": weighted_mse(torch.zeros(1), val_z if val_z is not None and len(val_z) else z, weight)}
    return model, resid, report


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_top_k(cond_raw: Tensor, db_unit: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(cosines (B, k), indices (B, k))`` of the ``k`` most cosine-similar rows of ``db_unit`` (unit-norm
    raw conditions) to each row of ``cond_raw``, most similar first; ``exclude`` (B, n) masks rows out."""
    sims = unit_rows(cond_raw.float()) @ db_unit.float().to(cond_raw.device).T
    if exclude is not None:
        sims = sims.masked_fill(exclude, -float("inf"))
    return sims.topk(min(k, sims.shape[1]), dim=1)


def softmax_weights(sims: Tensor, tau: float) -> Tensor:
    """Blend weights ``softmax(cos / tau)`` over the last dimension."""
    return torch.softmax(sims / tau, dim=-1)


def neighbour_weights(cond_raw: Tensor, db_unit: Tensor, k: int, tau: float,
                      exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(weights (B, k), indices (B, k))``: softmax(cos / tau) over the ``k`` most cosine-similar rows
    of ``db_unit`` (unit-norm raw conditions); ``exclude`` (B, n) masks rows out."""
    top, idx = cosine_top_k(cond_raw, db_unit, k, exclude)
    return softmax_weights(top, tau), idx


#: Neighbour counts and softmax temperatures (on cosine similarity) tried for the neighbour mean.
NEIGHBOUR_K = (8, 16, 32, 64, 128)
NEIGHBOUR_TAU = (0.02, 0.05, 0.1, 0.2, 0.5)
#: Weights of the kernel ridge mean in the combination ``a * ridge + (1 - a) * neighbours``.
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class NeighbourMean:
    """Nadaraya-Watson mean: softmax(cos(c, c_j) / tau) over the top-k training rows, of their latents.

    The same kernel as the ``blend`` strategy (cosine of the raw embeddings), in latent space.
    """

    cond: Tensor  # (n, C) unit-norm raw training conditions
    z: Tensor  # (n, K)
    k: int
    tau: float

    def __call__(self, cond_raw: Tensor, exclude: Tensor | None = None) -> Tensor:
        w, idx = neighbour_weights(cond_raw, self.cond, self.k, self.tau, exclude)
        return torch.einsum("bk,bkd->bd", w, self.z.to(cond_raw.device)[idx])


def fit_neighbour_mean(cond_raw: Tensor, z: Tensor, val_cond_raw: Tensor, val_z: Tensor,
                       weight: Tensor | None = None) -> tuple[NeighbourMean, dict]:
    """Choose ``(k, tau)`` of the neighbour mean on validation rows (weighted squared error)."""
    base = NeighbourMean(unit_rows(cond_raw.float()), z.float(), max(NEIGHBOUR_K), 1.0)
    scores, best, best_err = {}, None, float("inf")
    for k in NEIGHBOUR_K:
        for tau in NEIGHBOUR_TAU:
            base.k, base.tau = k, tau
            err = weighted_mse(base(val_cond_raw), val_z, weight)
            scores[f"k={k},tau={tau:g}"] = err
            if err < best_err:
                best, best_err = (k, tau), err
    base.k, base.tau = best
    return base, {"k": best[0], "tau": best[1], "best_mse": best_err}


def cross_fit_neighbours(mean: NeighbourMean, cond_raw: Tensor, fold: Tensor) -> Tensor:
    """Each training row predicted by the neighbour mean without its own fold (its person)."""
    out = torch.empty_like(mean.z)
    for f in fold.unique():
        mask = fold == f
        out[mask] = mean(cond_raw[mask], exclude=mask[None, :].expand(int(mask.sum()), -1))
    return out


#: Neighbour counts, softmax temperatures and shrinkage (towards the global covariance) tried for
#: the local residual covariance.
COV_K = (64, 128, 256, 512)
COV_TAU = (0.1, 0.2, 0.5, 1.0)
COV_SHRINK = (0.05, 0.15, 0.3, 0.6)


@dataclass
class LocalCovariance:
    """The residual covariance around the conditional mean, as it varies with the face.

    ``S(c) = (1 - shrink) * sum_j w_j(c) r_j r_j^T + shrink * global``: ``w`` are the neighbour
    weights of :class:`NeighbourMean` (softmax of cosine similarities over the top ``k``
    training rows), ``r_j`` the training rows' cross-fitted residuals, ``global`` their covariance.
    A face's samples spread as the residuals of people who look like it do: the spread, and the
    second-order term it adds to the expected delta W (``E[B A] = B(mu) A(mu) + Cov`` terms), both
    depend on the face.
    """

    cond: Tensor  # (n, C) unit-norm raw training conditions
    resid: Tensor  # (n, K) cross-fitted residuals (standardized latent units)
    k: int
    tau: float
    shrink: float
    global_cov: Tensor  # (K, K)

    def __call__(self, cond_raw: Tensor) -> Tensor:
        """``S(c)`` for raw conditions ``(B, C)`` -> ``(B, K, K)``."""
        w, idx = neighbour_weights(cond_raw, self.cond, self.k, self.tau)
        r = self.resid.to(cond_raw.device)[idx] * w.sqrt().unsqueeze(-1)  # (B, k, K)
        return (1 - self.shrink) * (r.transpose(1, 2) @ r) + self.shrink * self.global_cov.to(cond_raw.device)


def gaussian_nll(cov: Tensor, x: Tensor) -> Tensor:
    """Per-row negative log-likelihood (without the constant) of ``x`` (B, K) under N(0, cov (B, K, K))."""
    chol = torch.linalg.cholesky(cov.double() + 1e-9 * torch.eye(cov.shape[-1], dtype=torch.float64))
    sol = torch.cholesky_solve(x.double().unsqueeze(-1), chol).squeeze(-1)
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) + 0.5 * (x.double() * sol).sum(-1)


def fit_local_covariance(cond_raw: Tensor, resid: Tensor, val_cond_raw: Tensor, val_resid: Tensor,
                         max_rows: int = 400) -> tuple[LocalCovariance, dict]:
    """Choose ``(k, tau, shrink)`` by the Gaussian log-likelihood of validation residuals.

    ``resid``: cross-fitted training residuals; ``val_resid``: validation people's residuals
    around the mean fitted on training rows (a proper score of the covariance; the neighbours are
    training rows only). Shrink 1 (the global covariance, face-independent) is always a candidate.
    """
    glob = torch.cov(resid.double().T).float().reshape(resid.shape[1], resid.shape[1])
    model = LocalCovariance(unit_rows(cond_raw.float()), resid.float(), max(COV_K), 1.0, 0.0, glob)
    vc, vr = val_cond_raw[:max_rows], val_resid[:max_rows]
    glob_nll = float(gaussian_nll(glob.expand(len(vc), -1, -1), vr).mean())  # shrink 1: face-independent
    scores = {"shrink=1": glob_nll}
    best, best_nll = (COV_K[0], COV_TAU[0], 1.0), glob_nll
    for k in COV_K:
        for tau in COV_TAU:
            model.k, model.tau, model.shrink = k, tau, 0.0
            local = model(vc)  # the neighbour part, mixed with the global one for every shrink
            for shrink in COV_SHRINK:
                nll = float(gaussian_nll((1 - shrink) * local + shrink * glob, vr).mean())
                scores[f"k={k},tau={tau:g},shrink={shrink:g}"] = nll
                if nll < best_nll:
                    best, best_nll = (k, tau, shrink), nll
    model.k, model.tau, model.shrink = best
    return model, {"k": best[0], "tau": best[1], "shrink": best[2], "validation_nll": best_nll,
                   "global_validation_nll": glob_nll, "on": f"{len(vc)} validation rows, Gaussian log-likelihood"}


#: Neighbour counts tried for the residual model's training pairs (see :func:`choose_pair_neighbours`).
PAIR_K = (8, 16, 32, 64, 128)


def top_neighbours(query_raw: Tensor, db_raw: Tensor, k: int, batch: int = 2048) -> Tensor:
    """Indices ``(n, k)`` of the ``k`` rows of ``db_raw`` most cosine-similar to each query row."""
    db = unit_rows(db_raw.float())
    out = [neighbour_weights(query_raw[i : i + batch], db, k, 1.0)[1] for i in range(0, len(query_raw), batch)]
    return torch.cat(out) if out else torch.zeros(0, min(k, len(db)), dtype=torch.long)


def choose_pair_neighbours(cond_raw: Tensor, resid: Tensor, val_cond_raw: Tensor, val_resid: Tensor,
                           weight: Tensor | None = None, samples: int = 8, max_rows: int = 400,
                           seed: int = 0, val_mean: Tensor | None = None, energy=None) -> tuple[int, dict]:
    """How many neighbours define a face's residual distribution, chosen on validation people.

    The residual model learns ``p(r | face)`` from pairs (a training face, the residual of one of
    its ``k`` nearest training faces): with one or two LoRAs per person the residual of a face is
    one point, its neighbours' residuals are the sample of its conditional. For each ``k`` the
    validation faces draw ``samples`` distinct residuals of their ``k`` nearest training faces and are
    scored by the energy score (a proper scoring rule) against their true residual, in raw
    latent units (``weight``: per-dimension scale), or by ``energy(samples (n, S, K), truth (n, K))``
    on ``val_mean + residual`` (e.g. in delta-W space). Returns ``(k, report)``.
    """
    vc, vr = val_cond_raw[:max_rows], val_resid[:max_rows].float()
    scale = torch.ones(resid.shape[1]) if weight is None else weight.float()
    nb = top_neighbours(vc, cond_raw, max(PAIR_K))
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for k in PAIR_K:
        k_ = min(k, nb.shape[1])
        # ``samples`` distinct neighbours (drawn with replacement, a small k repeats residuals and
        # the energy score's spread term penalizes the repeats, not the distribution)
        order = torch.rand(len(vc), k_, generator=g).argsort(dim=1)[:, : min(samples, k_)]
        pick = nb[torch.arange(len(vc))[:, None], order]
        if energy is None:
            scores[k] = float(energy_scores(resid.float()[pick] * scale, vr * scale).mean())
        else:
            vm = val_mean[: len(vc)].float()
            scores[k] = float(energy(vm[:, None] + resid.float()[pick], vm + vr).mean())
    best = min(scores, key=scores.get)
    return best, {"k": best, "energy_score": {str(k): v for k, v in scores.items()},
                  "on": f"{len(vc)} validation rows, energy score of {samples} neighbour residuals"
                        + (" in raw latent units" if energy is None else " (given score)")}


def look_alike_spread(emb_sims: Tensor, delta_cos: Tensor) -> tuple[float, dict]:
    """How alike the LoRAs of two people with *the same* face embedding are (mean delta-W cosine),
    extrapolated from look-alike pairs: the intercept at embedding cosine 1 of the least-squares
    line ``delta_cos = a + b * (1 - emb_sims)`` over (validation face, one of its nearest training
    faces) pairs, ``emb_sims`` and ``delta_cos`` both (n, k). Two people whose faces look
    the same still differ in what the photo does not show; this is how much, which is the spread
    a sampler's draws for one face should have (a variogram's nugget). Returns ``(a, report)``.
    """
    x = (1 - emb_sims.double()).reshape(-1)
    y = delta_cos.double().reshape(-1)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    a, b = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    a = min(max(a, -1.0), 1.0)
    return a, {"pairwise_cosine": a, "slope": b, "pairs": int(len(x)),
               "nearest_embedding_cosine_median": float(emb_sims[:, 0].median()),
               "nearest_delta_cosine_mean": float(delta_cos[:, 0].mean())}


__all__ = ["look_alike_spread", "KernelMean", "LocalCovariance", "neighbour_weights", "cosine_top_k", "softmax_weights", "weighted_mse", "top_neighbours", "choose_pair_neighbours", "PAIR_K", "fit_local_covariance", "gaussian_nll", "NeighbourMean", "fit_kernel_mean", "fit_neighbour_mean", "cross_fit_neighbours", "make_folds",
           "unit_rows", "GAMMA_GRID", "RIDGE_GRID", "NEIGHBOUR_K", "NEIGHBOUR_TAU", "MIX_GRID"]
