"""lorasynth: zero-shot LoRA synthesis for Stable Diffusion."""

__version__ = "0.1.0"
