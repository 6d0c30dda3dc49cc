"""ΔW geometry of flattened LoRA vectors: inner products, cosines and energy scores, from factors.

Every function here works on flat vectors of a :class:`~lorasynth.core.layout.Layout` whose factors
have scale 1 (canonical vectors, or raw ones with alpha = rank) and measures what a LoRA does to
the weights, ``ΔW = B A`` per module, summed over modules, without ever forming ``ΔW``:
``<B1 A1, B2 A2> = sum_ij (B1^T B2)_ij (A1 A2^T)_ij``. One Gram routine (:func:`cross_gram`)
serves them all; the energy score has one implementation (:func:`energy_from_distances`) used in
ΔW space and in a latent space alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lorasynth.core.layout import Layout


def factor_views(layout: Layout, v: torch.Tensor):
    """Per module of ``layout``: ``(B (n, out, r), A (n, r, in))`` views into rows ``v`` (n, D)."""
    pos = 0
    for spec in layout.modules:
        r, n_in, n_out = spec.rank, math.prod(spec.down_shape[1:]), spec.up_shape[0]
        nd, nu = r * n_in, n_out * r
        a = v[:, pos : pos + nd].reshape(-1, r, n_in)
        b = v[:, pos + nd : pos + nd + nu].reshape(-1, n_out, r)
        yield b, a
        pos += nd + nu


def _float64(x) -> torch.Tensor:
    return torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x), dtype=torch.float64)


def cross_gram(layout: Layout, x, y) -> torch.Tensor:
    """``<ΔW(x[n, s]), ΔW(y[n, t])>`` for every group ``n``: ``x`` (n, S, D), ``y`` (n, T, D) -> (n, S, T).

    float64. Per module and per pair of rank components ``(i, j)``, two small batched Grams
    (``B_i B_j^T`` over outputs, ``A_i A_j^T`` over inputs) multiplied elementwise: memory stays at
    one ``(n, S, T)`` block, and a rank-1 layout (weights2weights) costs two matrix products a module.
    """
    x, y = _float64(x), _float64(y)
    n, s, d = x.shape
    t = y.shape[1]
    g = torch.zeros(n, s, t, dtype=torch.float64)
    for (bx, ax), (by, ay) in zip(factor_views(layout, x.reshape(n * s, d)), factor_views(layout, y.reshape(n * t, d))):
        bx, ax = bx.reshape(n, s, *bx.shape[1:]), ax.reshape(n, s, *ax.shape[1:])
        by, ay = by.reshape(n, t, *by.shape[1:]), ay.reshape(n, t, *ay.shape[1:])
        for i in range(bx.shape[-1]):
            for j in range(by.shape[-1]):
                g += (bx[..., i] @ by[..., j].mT) * (ax[:, :, i, :] @ ay[:, :, j, :].mT)
    return g


def delta_inner(layout: Layout, x, y) -> torch.Tensor:
    """``<ΔW(x_i), ΔW(y_i)>`` row by row (rows broadcast, e.g. many rows against one mean): float64 ``(n,)``."""
    x, y = torch.broadcast_tensors(torch.atleast_2d(_float64(x)), torch.atleast_2d(_float64(y)))
    return cross_gram(layout, x[:, None], y[:, None])[:, 0, 0]


def delta_gram(layout: Layout, x, y) -> np.ndarray:
    """All ``<ΔW(x_i), ΔW(y_j)>``: float64 ``(len x, len y)``."""
    x, y = torch.atleast_2d(_float64(x)), torch.atleast_2d(_float64(y))
    return cross_gram(layout, x[None], y[None])[0].numpy()


def gram_to_cosines(g: torch.Tensor) -> torch.Tensor:
    """A Gram block ``(n, S, S)`` -> the cosines among its rows."""
    norm = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
    return g / (norm[..., :, None] * norm[..., None, :])


def delta_cosine(layout: Layout, x, y) -> torch.Tensor:
    """Cosine between the concatenated ΔW of all modules of flat vectors ``x`` and ``y``, row by row.

    Rows broadcast (e.g. many rows against one mean vector). Returns float64 ``(n,)``.
    """
    x, y = torch.broadcast_tensors(torch.atleast_2d(_float64(x)), torch.atleast_2d(_float64(y)))
    g = cross_gram(layout, torch.stack([x, y], 1), torch.stack([x, y], 1))
    return g[:, 0, 1] / (torch.sqrt(g[:, 0, 0].clamp_min(0) * g[:, 1, 1].clamp_min(0)) + 1e-30)


def delta_cosine_blocks(layout: Layout, x) -> np.ndarray:
    """ΔW cosines among each face's rows: ``x`` (n, S, D) flat vectors -> (n, S, S)."""
    x = _float64(x)
    return gram_to_cosines(cross_gram(layout, x, x)).numpy()


def gram_to_distances(g: torch.Tensor) -> torch.Tensor:
    """A Gram block ``(n, S, S)`` -> the Euclidean distances among its rows."""
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    return (diag[..., :, None] + diag[..., None, :] - 2 * g).clamp_min(0).sqrt()


def energy_from_distances(dist: torch.Tensor) -> torch.Tensor:
    """Energy score per group from distances among ``S`` samples and the truth (the last row):
    ``dist`` (n, S+1, S+1) -> (n,); lower is better.

    ``E|X - y| - 0.5 E|X - X'|``: strictly proper, so it is minimised by the true conditional
    distribution; a sampler that collapses to a point or sprays too widely loses.
    """
    s = dist.shape[-1] - 1
    fit = dist[:, :s, s].mean(dim=1)
    pair = dist[:, :s, :s].sum(dim=(1, 2)) / max(s * (s - 1), 1)
    return fit - 0.5 * pair


@torch.no_grad()
def energy_scores(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Energy score in a vector space (e.g. a latent space): ``samples`` (n, S, K), ``truth`` (n, K) -> (n,)."""
    points = torch.cat([samples, truth[:, None]], dim=1)
    return energy_from_distances(torch.cdist(points, points))


def delta_energy_scores(layout: Layout, samples, truth) -> np.ndarray:
    """Energy score in ΔW space (Frobenius distances of the updates): ``samples`` (n, S, D) flat
    vectors for ``truth`` (n, D) -> (n,); lower is better.

    Strictly proper for the distribution of the update a LoRA makes, which is what a LoRA's user
    sees (distances in a latent space weigh directions by how they vary, not by what they do).
    """
    points = torch.cat([_float64(samples), _float64(truth)[:, None]], dim=1)
    return energy_from_distances(gram_to_distances(cross_gram(layout, points, points))).numpy()


__all__ = ["factor_views", "cross_gram", "delta_inner", "delta_gram", "delta_cosine", "delta_cosine_blocks",
           "gram_to_cosines", "gram_to_distances", "energy_from_distances", "energy_scores", "delta_energy_scores"]
