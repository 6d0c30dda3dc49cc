"""The hypernetwork: face embedding -> LoRA latent (closed-form mean + residual diffusion).

``HypernetConfig`` / ``Denoiser`` / ``Hypernet`` (model.py: loading and sampling) import only torch and
safetensors; the closed-form fits are in regression.py. Training (Lightning) is
:mod:`lorasynth.training.hypernet`.
"""

from __future__ import annotations

from lorasynth.models.hypernet.model import CONFIG_FILE, WEIGHTS_FILE, Denoiser, Hypernet, HypernetConfig

__all__ = ["CONFIG_FILE", "Denoiser", "Hypernet", "HypernetConfig", "WEIGHTS_FILE"]
