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

import os
from pathlib import Path

from lorasynth.errors import ModelError
from lorasynth.models.latent.base import (LatentModel, decode_rows, encode_rows, reconstruct, reconstruction_cosine,
                                          row_stats, rows_of)
from lorasynth.models.latent.export import Reader
from lorasynth.models.latent.pca import PCA
from lorasynth.models.latent.vae import VAENet

__all__ = ["LatentModel", "PCA", "VAENet", "decode_rows", "encode_rows", "load_latent", "reconstruct",
           "reconstruction_cosine", "row_stats", "rows_of"]


def load_latent(path: str | Path, read: Reader | None = None, kind: str | None = None) -> LatentModel:
    """Load an exported PCA (``pca.json``) or VAE (``vae.json``) from a directory.

    ``read``: where the files come from (default: the folder; a model folder passes a reader of
    hash-checked bytes) and ``kind`` (``"vae"`` / ``"pca"``; default: whichever config exists).
    Neither imports Lightning: a VAE loads as the plain-torch :class:`~lorasynth.models.latent.vae.VAENet`
    (training uses its Lightning subclass :class:`~lorasynth.training.latent.LoRAVAE`).
    """
    path = Path(path)
    if kind is None:
        kind = "vae" if os.path.lexists(path / "vae.json") else "pca" if os.path.lexists(path / "pca.json") else None
    if kind == "vae":
        return VAENet.load(path, read=read)
    if kind == "pca":
        return PCA.load(path, read=read)
    raise ModelError(f"no latent model in {path} (expected vae.json + vae.safetensors or pca.json + pca.safetensors)")
