"""Synthesis: the Synthesizer (face -> LoRA, four strategies), latent editing, held-out evaluation."""

from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesized, Synthesizer, write_synthesized

__all__ = ["SynthesisSettings", "Synthesized", "Synthesizer", "write_synthesized"]
