"""The hypernetwork: face embedding -> LoRA latent (closed-form mean + residual diffusion).

``HypernetConfig`` / ``Denoiser`` / ``Hypernet`` (model.py: loading and sampling) import only
torch and safetensors; ``HypernetDiffusion`` and ``latent_dataloader`` (diffusion.py: training)
pull in Lightning, so they are loaded lazily on first access.
"""

from __future__ import annotations

from .model import CONFIG_FILE, WEIGHTS_FILE, Denoiser, Hypernet, HypernetConfig

_LAZY = {"HypernetDiffusion", "latent_dataloader", "calibrate_sampling"}

__all__ = ["CONFIG_FILE", "Denoiser", "Hypernet", "HypernetConfig", "HypernetDiffusion", "WEIGHTS_FILE",
           "calibrate_sampling", "latent_dataloader"]


def __getattr__(name: str):
    if name in _LAZY:
        from . import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
