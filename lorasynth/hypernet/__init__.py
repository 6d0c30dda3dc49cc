"""The hypernetwork: a conditional latent diffusion model, face embedding -> LoRA latent.

``HypernetConfig`` / ``Denoiser`` (model.py) import only torch; ``HypernetDiffusion`` and
``latent_dataloader`` (diffusion.py) pull in Lightning and diffusers, so they are loaded
lazily on first access.
"""

from __future__ import annotations

from .model import Denoiser, HypernetConfig

_LAZY = {"HypernetDiffusion", "latent_dataloader", "WEIGHTS_FILE", "CONFIG_FILE"}

__all__ = ["CONFIG_FILE", "Denoiser", "HypernetConfig", "HypernetDiffusion", "WEIGHTS_FILE", "latent_dataloader"]


def __getattr__(name: str):
    if name in _LAZY:
        from . import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
