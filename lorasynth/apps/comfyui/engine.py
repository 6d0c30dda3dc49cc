"""Thin adapter between the nodes and lorasynth's synthesis internals (no ComfyUI import).

It opens a synthesis model folder, checks that it synthesizes SD1.5 LoRAs, and turns one
photo (an H x W x 3 array) into a LoRA plus the face crop it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorasynth.errors import ModelError
from lorasynth.core.lora import LoRA
from lorasynth.apps.comfyui.convert import check_sd15_shapes

#: Margin added around the detected face box on each side, as a fraction of the box size.
CROP_MARGIN = 0.25


@dataclass
class FaceLoRA:
    lora: LoRA
    crop: np.ndarray  # h x w x 3 uint8, the face the LoRA was synthesized from
    description: str  # e.g. "1 face found, used the largest (index 0)"


class SynthesisEngine:
    """A loaded synthesis model (the ``LORASYNTH_MODEL`` value passed between nodes)."""

    def __init__(self, model_dir: str | Path):
        from lorasynth.synthesis.synthesizer import Synthesizer

        self.path = Path(model_dir)
        self.synthesizer = Synthesizer(self.path)
        self._check_base()

    def _check_base(self) -> None:
        shapes = {s.name: (s.up_shape[0], *s.down_shape[1:]) for s in self.synthesizer.layout.modules}
        check_sd15_shapes(shapes, f"synthesis model {self.path.name}", ModelError)

    def __repr__(self) -> str:
        return f"SynthesisEngine({str(self.path)!r})"

    def synthesize(self, rgb: np.ndarray, face_index: int = 0, strategy: str = "diffusion",
                   guidance: float | None = None, seed: int = 0) -> FaceLoRA:
        from lorasynth.synthesis.synthesizer import SynthesisSettings

        settings = SynthesisSettings(strategy=strategy, guidance=guidance, seed=int(seed))
        settings.validate()
        if strategy == "sample":  # a new identity: the photo is not used
            result = self.synthesizer.synthesize(None, settings, source="comfyui")[0]
            return FaceLoRA(result.lora, rgb, "strategy sample: new identity, photo not used")
        embedding, selection = self.synthesizer.embed_photo(rgb, face_index=face_index)
        result = self.synthesizer.synthesize(embedding, settings, source="comfyui")[0]
        result.lora.metadata["lorasynth.face"] = selection.describe()
        return FaceLoRA(result.lora, crop_face(rgb, selection.face.box), selection.describe())


def crop_face(rgb: np.ndarray, box, margin: float = CROP_MARGIN) -> np.ndarray:
    """The face box of ``rgb`` with ``margin`` on each side, clipped to the image."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    left, top = max(0, int(round(x0 - mx))), max(0, int(round(y0 - my)))
    right, bottom = min(w, int(round(x1 + mx))), min(h, int(round(y1 + my)))
    if right <= left or bottom <= top:
        return rgb
    return np.ascontiguousarray(rgb[top:bottom, left:right])
