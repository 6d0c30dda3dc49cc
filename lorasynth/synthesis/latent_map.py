"""The 2-D latent map: PCA of a synthesis model's library latents, and LoRAs projected onto it.

One implementation for the web app's map (``GET /api/library/map``) and the demo's
``latent_map.png``::

    m = library_map(syn, max_points=4000)      # the library's training rows, PCA to 2-D
    m.points, m.ids                              # (n, 2) coordinates and the pack ids
    project_vectors(syn, m, vectors)             # raw flat canonical LoRA vectors -> (m, 2)

The latents are the latent model's codes (VAE means / PCA coefficients) of the pack rows the
model was trained on; the map is computed in float64. The axes' signs are whatever the SVD
returns (deterministic for one machine and one set of rows). Pure numpy/torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorasynth.models.latent import encode_rows

if TYPE_CHECKING:
    from lorasynth.synthesis.synthesizer import Synthesizer


@dataclass(frozen=True)
class LatentMap:
    """The first two principal axes of a set of latents, and those latents on them."""

    mean: np.ndarray  # (d,) float64: the latents' mean
    axes: np.ndarray  # (2, d) float64: the first two principal axes (right singular vectors)
    points: np.ndarray  # (n, 2) float64: the latents the map was fitted on, projected
    rows: np.ndarray  # (n,) the pack rows of ``points``
    ids: list[str]  # (n,) their pack ids

    def project(self, latents) -> np.ndarray:
        """``(m, d)`` latents -> ``(m, 2)`` map coordinates (float64)."""
        return (np.asarray(latents, dtype=np.float64) - self.mean) @ self.axes.T


def map_rows(rows: np.ndarray, max_points: int | None = None, seed: int = 0) -> np.ndarray:
    """``rows``, or a sorted random subset of ``max_points`` of them (the same subset for one seed)."""
    if max_points is not None and len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    return rows


def fit_map(latents: np.ndarray, rows: np.ndarray, ids: list[str]) -> LatentMap:
    """The 2-D PCA of ``(n, d)`` latents (float64; centred, SVD, first two right singular vectors)."""
    z = np.asarray(latents, dtype=np.float64)
    mu = z.mean(axis=0)
    _, _, vt = np.linalg.svd(z - mu, full_matrices=False)
    return LatentMap(mean=mu, axes=vt[:2], points=(z - mu) @ vt[:2].T, rows=np.asarray(rows), ids=list(ids))


def library_map(syn: Synthesizer, max_points: int | None = None, seed: int = 0) -> LatentMap:
    """The map of ``syn``'s library: its training rows (at most ``max_points``, see :func:`map_rows`)."""
    rows = map_rows(syn.train_rows, max_points, seed)
    z = encode_rows(syn.latent, syn.pack, rows).numpy().astype(np.float64)
    return fit_map(z, rows, [syn.pack.ids[r] for r in rows])


def encode_vectors(syn: Synthesizer, vectors: np.ndarray) -> np.ndarray:
    """``(m, D)`` raw flat canonical LoRA vectors -> ``(m, d)`` latents (float64)."""
    with torch.no_grad():
        return syn.latent.encode(syn.latent.standardize(vectors)).double().numpy()


def project_vectors(syn: Synthesizer, latent_map: LatentMap, vectors: np.ndarray) -> np.ndarray:
    """``(m, D)`` raw flat canonical LoRA vectors -> ``(m, 2)`` coordinates on ``latent_map``."""
    return latent_map.project(encode_vectors(syn, vectors))
