"""lorasynth: zero-shot LoRA synthesis for Stable Diffusion 1.5, and a LoRA toolkit around it.

The public Python API (everything else is internal and may change)::

    import lorasynth

    syn = lorasynth.Synthesizer.from_pretrained("my-model")   # a model folder, or a hub id "org/name"
    lora = syn("me.jpg", seed=0)                  # one face photo -> a LoRA (provenance in lora.metadata)
    lora = syn(embedding=e, strategy="blend")     # or from an embedding; strategy nearest | sample too
    lora.save("me.safetensors")                   # kohya (default); format="diffusers" | "peft"
    pipe.load_lora_weights(lora.to_diffusers(), adapter_name="me")   # in memory, no file

    style = lorasynth.load_lora("style.safetensors")       # kohya / diffusers / peft, auto-detected
    mix = lorasynth.blend([(lora, 0.8), (style, 0.4)])     # the exact weighted sum of the updates
    with lorasynth.fused(pipe, [(mix, 1.0)]):              # fused into the weights, restored bit-exactly
        image = pipe("a photo of sks person").images[0]

    lib = lorasynth.Library.open("lib")           # a LoRA library (SQLite + content-addressed blobs)

Names (imported on first use, so ``import lorasynth`` itself is cheap):

=====================  ===================================================================
``load_lora``          read a LoRA file into a :class:`LoRA`
``LoRA``               modules ``{name: LoRAModule(down, up, alpha)}`` + metadata; ``.save``, ``.to_diffusers``
``blend``              exact (or rank-truncated) weighted sum of LoRAs
``fused`` / ``fuse``   fuse LoRAs into a diffusers pipeline; restore the original weights exactly
``Synthesizer``        face photo / embedding -> LoRA with a trained model (``from_pretrained``)
``SynthesisModel``     a model folder: ``from_pretrained``, ``save_pretrained`` (hub-style, model card)
``Library``            the LoRA library
``load_pipeline``      a Stable Diffusion 1.5 pipeline for CPU (diffusers), without safety checker
``LorasynthError``     base of every error lorasynth raises on purpose (``FormatError``, ``ModelError``...)
=====================  ===================================================================
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_lora": "lorasynth.apps.api",
    "blend": "lorasynth.apps.api",
    "LoRA": "lorasynth.core.lora",
    "LoRAModule": "lorasynth.core.lora",
    "fused": "lorasynth.runtime.apply",
    "fuse": "lorasynth.runtime.apply",
    "Synthesizer": "lorasynth.synthesis.synthesizer",
    "SynthesisModel": "lorasynth.models.model_folder",
    "Library": "lorasynth.library.store",
    "load_pipeline": "lorasynth.runtime.pipeline",
    "LorasynthError": "lorasynth.errors",
    "FormatError": "lorasynth.errors",
    "LayoutError": "lorasynth.errors",
    "ModelError": "lorasynth.errors",
    "FaceError": "lorasynth.errors",
    "ImageError": "lorasynth.errors",
    "LibraryError": "lorasynth.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorasynth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
