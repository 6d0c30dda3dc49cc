"""What makes CPU generation fast, decided in one place for every interface.

The command line (``generate``), the Python API (:func:`lorasynth.load_pipeline`,
:func:`lorasynth.runtime.pipeline.generate`), the web app's previews and the ComfyUI nodes all go
through :func:`~lorasynth.runtime.pipeline.load_pipeline` and
:func:`~lorasynth.runtime.pipeline.generate`, which read these defaults:

* **dtype** ``"auto"``: bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16; about
  2.5x faster than float32 per UNet step), float32 elsewhere. ``"fp32"`` is the reference, one
  flag away (``--dtype fp32``).
* **channels-last** weights for the UNet and the VAE, and PyTorch's scaled-dot-product attention
  (diffusers' default processor on torch 2).
* **the text encoder runs once per prompt**: the prompt embeddings are cached on the pipeline,
  keyed on the prompt and on the identity of the text encoder's weight tensors (fusing a LoRA into
  the text encoder swaps those tensors, so the cache never serves stale embeddings).
* **the VAE decodes in the pipeline's dtype**, tiled above :data:`TILE_ABOVE_PIXELS` (bounded
  memory for large images); a tiny decoder (``AutoencoderTiny`` / TAESD folder) when one is given.
* **few steps** (:data:`FEW_STEP`): an LCM or other distillation LoRA fused with the identity LoRA
  (one exact sum of updates), the LCM scheduler, 4 steps, guidance 1 (no classifier-free batch).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path

import torch

from lorasynth.errors import LorasynthError, ModelError

#: dtype names: "auto" resolves to one of the others on this CPU (:func:`resolve_dtype`).
DTYPE_NAMES = ("auto", "fp32", "bf16")
#: The VAE decodes in tiles above this many pixels (width x height): 1024 x 1024.
TILE_ABOVE_PIXELS = 1024 * 1024
#: Prompt embeddings kept per pipeline (the web app alternates between a few prompts).
PROMPT_CACHE_SIZE = 8
#: The few-step recipe for distillation LoRAs (LCM-LoRA): scheduler, steps, guidance.
FEW_STEP = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}

_CPU_FLAGS_BF16 = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None, capability: str | None = None) -> bool:
    """True when the CPU multiplies bfloat16 natively: AMX or AVX512-BF16 in its flags, or torch's
    own detection (``torch.backends.cpu.get_cpu_capability()`` reports ``AVX512_BF16`` /
    ``AMX``-class capabilities on newer builds)."""
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in _CPU_FLAGS_BF16):
        return True
    if capability is None:
        try:
            capability = torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):
            capability = ""
    return any(tag in capability.upper() for tag in ("AMX", "BF16"))


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` on CPUs with native bfloat16 (and on CUDA), else ``"fp32"``; other names as they are."""
    if name not in DTYPE_NAMES:
        raise LorasynthError(f"unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)}")
    if name != "auto":
        return name
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def load_tiny_vae(folder: str | Path, dtype: torch.dtype):
    """An ``AutoencoderTiny`` (TAESD) from a local diffusers folder, as the pipeline's decoder."""
    from diffusers import AutoencoderTiny

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"cannot load the tiny decoder {folder!r}: not a diffusers AutoencoderTiny folder "
                         f"(config.json + diffusion_pytorch_model.safetensors), e.g. madebyollin/taesd")
    try:
        vae = AutoencoderTiny.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    except Exception as exc:  # diffusers raises many kinds here; keep one line
        raise ModelError(f"cannot load the tiny decoder {folder!r}: {str(exc).splitlines()[0][:160]}") from exc
    return vae


def set_vae_tiling(pipe, width: int, height: int) -> bool:
    """Tile the VAE decode of images above :data:`TILE_ABOVE_PIXELS` (bounded memory), not below
    (tiling blends tile seams: a 512 px image decodes untiled, bit for bit as before)."""
    vae = pipe.vae
    tile = width * height > TILE_ABOVE_PIXELS
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling() if tile else vae.disable_tiling()
    return tile


def _weights_key(model) -> tuple:
    """Identity of a model's current weight tensors (a fused LoRA swaps them; restore swaps them back)."""
    return tuple(p.data_ptr() for p in model.parameters())


def prompt_embeddings(pipe, prompt: str, negative_prompt: str, guidance: float):
    """``(prompt_embeds, negative_prompt_embeds or None)`` for ``pipe``, computed once per prompt.

    Cached on the pipeline (:data:`PROMPT_CACHE_SIZE` entries), keyed on the prompts, on whether
    classifier-free guidance needs the negative embeddings, and on the text encoder's weight
    tensors (so a LoRA fused into the text encoder gets fresh embeddings, and restoring it finds
    the old ones again).
    """
    cfg = guidance > 1.0
    key = (prompt, negative_prompt, cfg, _weights_key(pipe.text_encoder), pipe.text_encoder.dtype)
    cache = pipe.__dict__.setdefault("_lorasynth_prompt_cache", OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    with torch.inference_mode():
        pos, neg = pipe.encode_prompt(prompt, pipe.device, 1, cfg, negative_prompt or None)
    cache[key] = (pos, neg if cfg else None)
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.popitem(last=False)
    return cache[key]


def load_unet_lowmem(folder: Path, dtype: torch.dtype):
    """The UNet of a local diffusers folder, read one tensor at a time and cast on the way, or None
    when the folder does not hold it as one ``unet/diffusion_pytorch_model.safetensors``.

    diffusers reads a component's whole state dict, then casts it into the model: for a moment
    the process holds the file's tensors and the model's (the UNet is 1.7 GB in 16 bits, 3.4 GB
    in fp32). Built on the meta device and filled tensor by tensor, the peak is the model plus
    one tensor. Every parameter is checked to be filled (else None: the caller loads normally).
    """
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file() or not (folder / "unet" / "config.json").is_file():
        return None
    config = UNet2DConditionModel.load_config(folder / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    want = dict(unet.named_parameters())
    filled = set()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key not in want:
                return None
            owner, _, name = key.rpartition(".")
            module = unet.get_submodule(owner) if owner else unet
            tensor = f.get_tensor(key).to(dtype)
            if tuple(tensor.shape) != tuple(want[key].shape):
                return None
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
            filled.add(key)
    if filled != set(want) or any(b.is_meta for b in unet.buffers()):
        return None
    return unet.eval()
