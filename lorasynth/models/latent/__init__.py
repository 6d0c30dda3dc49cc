"""Latent models of LoRA vectors: PCA (the weights2weights baseline) and the LoRA-VAE.

Both work on *standardised* vectors ``x = (raw - mean) / scale`` of one layout (the pack's
statistics, stored inside each model so that an exported model alone turns latents into
LoRAs) and share one API, so evaluation can swap them at equal latent size:

==========================  =================================================================
``model.dim``               input size ``D`` (the layout's vector length)
``model.latent_dim``        latent size ``k``
``model.layout_signature``  signature of the layout the model was trained on
``standardize(raw)``        raw flattened LoRA vectors ``(n, D)`` -> standardised
``destandardize(x)``        inverse
``encode(x)``               standardised ``(n, D)`` -> latent ``(n, k)`` (the VAE mean)
``decode(z)``               latent ``(n, k)`` -> standardised ``(n, D)``
``sample_latent(n, g)``     ``n`` latents from the model's prior (``g``: torch.Generator)
``sample(n, g)``            ``decode(sample_latent(n, g))``
``export(dir)``             ``<kind>.safetensors`` + ``<kind>.json`` (never pickle)
``Model.load(dir)``         inverse of export
==========================  =================================================================

:func:`load_latent` opens either kind from a directory; :func:`reconstruction_cosine` is the
shared evaluation (cosine between true and reconstructed LoRAs in raw space).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from lorasynth.errors import ModelError
from lorasynth.core.layout import Layout


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


def load_latent(path: str | Path) -> LatentModel:
    """Load an exported PCA (``pca.json``) or VAE (``vae.json``) from a directory.

    Neither imports Lightning: a VAE loads as the plain-torch :class:`~lorasynth.models.latent.vae.VAENet`
    (training uses its Lightning subclass :class:`~lorasynth.training.latent.LoRAVAE`).
    """
    path = Path(path)
    if (path / "vae.json").is_file():
        from lorasynth.models.latent.vae import VAENet

        return VAENet.load(path)
    if (path / "pca.json").is_file():
        from lorasynth.models.latent.pca import PCA

        return PCA.load(path)
    raise ModelError(f"no latent model in {path} (expected vae.json + vae.safetensors or pca.json + pca.safetensors)")


def _rows(data, idx) -> tuple[np.ndarray, Layout | None]:
    """Raw rows of a Pack or an array, and the pack's layout if any."""
    from lorasynth.library.pack import Pack

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
    from lorasynth.library.pack import RunningStats, std_floor

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
            raw, pack_layout = _rows(pack_or_vectors, all_idx[start : start + batch_size])
            rec = reconstruct(model, raw).cpu().double()
            truth = torch.from_numpy(raw).double()
            if metric == "vector":
                cos = torch.nn.functional.cosine_similarity(truth, rec, dim=1, eps=1e-30)
            else:
                from lorasynth.core.layout import delta_cosine

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


__all__ = ["LatentModel", "load_latent", "reconstruct", "reconstruction_cosine", "row_stats"]
