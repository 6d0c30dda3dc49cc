"""Fuse LoRAs into a diffusers Stable Diffusion pipeline on CPU, and restore it bit-exactly.

diffusers' ``fuse_lora``/``unfuse_lora`` subtract the update again on unfuse, which in
bf16 leaves ~2.4e-4 error in the weights. Here fusing swaps in a new weight tensor
``W + sum_j scale_j dW_j`` (computed in float32, cast once) and keeps the original
tensor object; restoring swaps it back, so the original weights return bit for bit in
any dtype, and no copy of the untouched weights is ever made.

    with fused(pipe, [(lora, 0.8), (other, 0.5)]):
        image = pipe(...)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from lorasynth.errors import LayoutError
from lorasynth.formats.keys import ModuleTree, some
from lorasynth.core.lora import LoRA, LoRAModule, stacked_factors
from lorasynth.core.sd15 import get_layer

LoRAWithScale = tuple[LoRA, float]


def pipeline_models(pipe) -> dict[str, torch.nn.Module]:
    """The components a LoRA may target: ``{'unet': ..., 'text_encoder': ...}``."""
    return {k: getattr(pipe, k) for k in ("unet", "text_encoder") if getattr(pipe, k, None) is not None}


def pipeline_tree(pipe) -> ModuleTree:
    """Module tree of a loaded pipeline, for resolving kohya names against the real model."""
    models = pipeline_models(pipe)
    return ModuleTree.from_models(models.get("unet"), models.get("text_encoder"))


def base_tree(base: str) -> ModuleTree:
    """Module tree of the base model ``base`` (as :func:`lorasynth.runtime.pipeline.load_pipeline` takes it),
    for checking LoRA files against a model other than SD1.5. A local diffusers folder is built
    on the meta device from its ``unet`` / ``text_encoder`` configs (no weights read, about a
    second); a hub id or single-file checkpoint is loaded."""
    from pathlib import Path

    from lorasynth.errors import ModelError

    root = Path(base).expanduser()
    if (root / "unet" / "config.json").is_file():
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        try:
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
                text = None
                if (root / "text_encoder" / "config.json").is_file():
                    text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"{base}: unreadable model config ({exc})") from exc
        return ModuleTree.from_models(unet, text)
    from lorasynth.runtime.pipeline import load_pipeline

    return pipeline_tree(load_pipeline(base))


def _target_layers(models: dict[str, torch.nn.Module], loras: Sequence[LoRAWithScale]) -> dict[str, torch.nn.Module]:
    """Find every target layer and check its shape, before anything is modified."""
    layers: dict[str, torch.nn.Module] = {}
    missing = []
    for lora, _ in loras:
        for name, m in lora.modules.items():
            if name not in layers:
                component, path = name.split(".", 1)
                try:
                    layers[name] = get_layer(models[component], component, path)
                    layers[name].weight
                except (KeyError, AttributeError):
                    layers.pop(name, None)
                    missing.append(name)
                    continue
            weight = layers[name].weight
            if tuple(weight.shape) != tuple(m.weight_shape):
                raise LayoutError(
                    f"LoRA module {name} does not fit the base model: update shape {tuple(m.weight_shape)}, "
                    f"model weight {tuple(weight.shape)} (is the LoRA for another base model?)"
                )
    if missing:
        raise LayoutError(f"LoRA targets modules the base model does not have: {some(missing)}")
    return layers


# Fused weights are written into per-weight scratch tensors that outlive restore(): on CPU,
# first-touching freshly allocated memory (page faults) cost ~5x the arithmetic of W + B A, so
# fusing again (another LoRA, another scale) reuses memory that is already mapped. The cost is
# one extra copy of each touched weight while the pipeline lives; release_buffers() frees it.
# The scratch tensor hangs on the Parameter itself, so it lives and dies with the model.
_SCRATCH_ATTR = "_lorasynth_fuse_scratch"


def _scratch_for(param: torch.nn.Parameter, original: torch.Tensor) -> torch.Tensor:
    buf = getattr(param, _SCRATCH_ATTR, None)
    if (buf is None or buf.shape != original.shape or buf.dtype != original.dtype
            or buf.device != original.device or buf.data_ptr() == original.data_ptr()):
        buf = torch.empty(original.shape, dtype=original.dtype, device=original.device)
        setattr(param, _SCRATCH_ATTR, buf)
    return buf


def release_buffers(pipe) -> None:
    """Free the scratch tensors kept on ``pipe``'s weights for re-fusing (see above)."""
    for model in pipeline_models(pipe).values():
        for param in model.parameters():
            if hasattr(param, _SCRATCH_ATTR):
                delattr(param, _SCRATCH_ATTR)


def _layer_factors(group: list[tuple[float, LoRAModule]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, alpha)`` with ``alpha * B @ A`` = the layer's total update, in float32.

    One LoRA on a layer (the usual case) uses its factors as they are, the scale going to
    the kernel's ``alpha``: no copies. Several are stacked along the rank into one product.
    """
    if len(group) == 1:
        (weight, m), = group
        return m.up.reshape(m.out_features, m.rank).float(), m.down.reshape(m.rank, -1).float(), weight * m.scale
    b, a = stacked_factors(group)
    return b, a, 1.0


class FusedLoRAs:
    """LoRAs fused into a pipeline; :meth:`restore` puts the exact original weights back."""

    def __init__(self, pipe, loras: Sequence[LoRAWithScale]):
        models = pipeline_models(pipe)
        layers = _target_layers(models, loras)
        parts: dict[str, list[tuple[float, LoRAModule]]] = {}
        for lora, scale in loras:
            for name, m in lora.modules.items():
                parts.setdefault(name, []).append((float(scale), m))
        self._originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            for name, group in parts.items():
                param = layers[name].weight
                original = param.data
                b, a, alpha = _layer_factors(group)
                w2d = original.reshape(original.shape[0], -1)
                buf = _scratch_for(param, original)
                out2d = buf.view(w2d.shape)
                if original.dtype == torch.float32 and b.shape[1] == 1:
                    torch.addr(w2d, b[:, 0], a[0], alpha=alpha, out=out2d)  # rank 1: outer product (gemm is 3x slower)
                elif original.dtype == torch.float32:
                    torch.addmm(w2d, b, a, alpha=alpha, out=out2d)  # one pass, no separate delta tensor
                else:  # bf16/fp16: one rounding of W + BA (accumulated in fp32 by the kernel)
                    out2d.copy_(w2d).addmm_(b.to(original.dtype), a.to(original.dtype), alpha=alpha)
                fused = buf
                if original.ndim == 4 and original.is_contiguous(memory_format=torch.channels_last):
                    fused = fused.contiguous(memory_format=torch.channels_last)
                self._originals.append((param, original))
                param.data = fused
        self.num_layers = len(parts)

    def restore(self) -> None:
        """Swap the original weight tensors back (bit-exact); safe to call twice."""
        with torch.no_grad():
            for param, original in reversed(self._originals):
                param.data = original
        self._originals.clear()

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def __enter__(self) -> "FusedLoRAs":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def fuse(pipe, loras: Sequence[LoRAWithScale]) -> FusedLoRAs:
    """Fuse ``[(lora, scale), ...]`` into ``pipe`` in place; returns the handle to restore."""
    return FusedLoRAs(pipe, loras)


@contextmanager
def fused(pipe, loras: Sequence[LoRAWithScale]) -> Iterator[FusedLoRAs]:
    """Context manager: LoRAs fused inside the block, original weights restored after."""
    handle = FusedLoRAs(pipe, loras)
    try:
        yield handle
    finally:
        handle.restore()
