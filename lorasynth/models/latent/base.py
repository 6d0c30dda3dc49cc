"""The latent models' shared API (:class:`LatentModel`), row statistics, encoding / decoding of
pack rows, and the reconstruction score; see :mod:`lorasynth.models.latent`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from lorasynth.core.layout import Layout
from lorasynth.library.pack import Pack, RunningStats, std_floor


@runtime_checkable
class LatentModel(Protocol):
    kind: str

    @property
    def dim(self) -> int: ...

    @property
    def latent_dim(self) -> int: ...

    @property
    def layout_signature(self) -> str: ...

    def standardize(self, raw) -> torch.Tensor: ...

    def destandardize(self, x) -> torch.Tensor: ...

    def encode(self, x) -> torch.Tensor: ...

    def decode(self, z) -> torch.Tensor: ...

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def export(self, out_dir) -> Path: ...


def rows_of(data, idx) -> tuple[np.ndarray, Layout | None]:
    """Raw rows of a Pack or an array, and the pack's layout if any."""
    if isinstance(data, Pack):
        idx = np.arange(data.n) if idx is None else np.asarray(idx)
        return data.read_rows(idx), data.layout
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    arr = arr.astype(np.float32, copy=False)
    return (arr if idx is None else arr[np.asarray(idx)]), None


def row_stats(pack, idx, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and floored std (float32) of pack rows ``idx`` only, streamed.

    Latent models standardise with the statistics of their *training* rows, so held-out people
    never shape a model (the pack's own ``mean``/``scale`` cover every row).
    """
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    stats = RunningStats(pack.dim)
    for start in range(0, len(idx), batch):
        stats.update(pack.read_rows(idx[start : start + batch]))
    return stats.mean.astype(np.float32), std_floor(stats.std)


@torch.no_grad()
def reconstruct(model: LatentModel, raw) -> torch.Tensor:
    """Raw vectors -> encode -> decode -> raw vectors (float32)."""
    return model.destandardize(model.decode(model.encode(model.standardize(raw))))


@torch.no_grad()
def reconstruction_cosine(
    model: LatentModel,
    pack_or_vectors,
    idx=None,
    *,
    metric: str = "vector",
    layout: Layout | None = None,
    batch_size: int = 256,
    per_item: bool = False,
):
    """Mean cosine between true and reconstructed LoRAs in raw (de-standardised) space.

    Args:
        model: a :class:`LatentModel` (PCA or VAE).
        pack_or_vectors: a :class:`~lorasynth.library.pack.Pack` or raw vectors ``(n, D)``.
        idx: rows to evaluate (e.g. held-out identities); all rows when None.
        metric: ``"vector"`` (cosine of the flat canonical vectors) or ``"delta"`` (cosine of
            the concatenated delta W of all modules; needs the pack's layout or ``layout``).
        per_item: return the per-row cosines (numpy) instead of their mean.
    """
    if metric not in ("vector", "delta"):
        raise ValueError("metric must be 'vector' or 'delta'")
    n = pack_or_vectors.n if hasattr(pack_or_vectors, "read_rows") else len(pack_or_vectors)
    all_idx = np.arange(n) if idx is None else np.asarray(idx).reshape(-1)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    out = []
    try:
        for start in range(0, len(all_idx), batch_size):
            raw, pack_layout = rows_of(pack_or_vectors, all_idx[start : start + batch_size])
            rec = reconstruct(model, raw).cpu().double()
            truth = torch.from_numpy(raw).double()
            if metric == "vector":
                cos = torch.nn.functional.cosine_similarity(truth, rec, dim=1, eps=1e-30)
            else:
                from lorasynth.core.delta import delta_cosine

                lay = layout or pack_layout
                if lay is None:
                    raise ValueError("metric='delta' needs a layout (pass layout=... or a Pack)")
                cos = delta_cosine(lay, truth, rec)
            out.append(cos.numpy())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    values = np.concatenate(out) if out else np.zeros(0)
    return values if per_item else float(values.mean())




@torch.no_grad()
def encode_rows(latent: LatentModel, pack, idx, batch_size: int = 256) -> torch.Tensor:
    """Latent codes (VAE means / PCA coefficients) of pack rows ``idx``, streamed in batches."""
    if hasattr(latent, "eval"):
        latent.eval()
    out = []
    idx = np.asarray(idx)
    for start in range(0, len(idx), batch_size):
        raw = pack.read_rows(idx[start : start + batch_size])
        out.append(latent.encode(latent.standardize(raw)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, latent.latent_dim)


@torch.no_grad()
def decode_rows(latent: LatentModel, z: torch.Tensor, dtype=np.float64) -> np.ndarray:
    """Raw latents (N, K) -> flat LoRA vectors (N, D) as a numpy array of ``dtype`` (the inverse of
    :func:`encode_rows`); the one decoding path of synthesis, training and evaluation."""
    return latent.destandardize(latent.decode(torch.as_tensor(z).float())).cpu().numpy().astype(dtype, copy=False)


__all__ = ["LatentModel", "decode_rows", "encode_rows", "reconstruct", "reconstruction_cosine", "row_stats", "rows_of"]
