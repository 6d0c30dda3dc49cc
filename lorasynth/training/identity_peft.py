"""Where an identity LoRA lives in the pipeline, and the peft adapter that trains it.

Target matching (which ``nn.Linear`` modules of the UNet and text encoder get a LoRA), the
layout those LoRAs share (:func:`identity_layout`), and the peft round trip: inject a
trainable adapter (:func:`inject_lora`), read its factors back as canonical
:class:`~lorasynth.core.lora.LoRAModule` s (:func:`extract_lora`), take it out again
(:func:`remove_lora`). See :mod:`lorasynth.training.identity_lora` for the whole recipe.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from lorasynth.errors import LayoutError, ModelError
from lorasynth.core.layout import Layout, ModuleSpec
from lorasynth.core.lora import LoRAModule
from lorasynth.core.sd15 import file_path
from lorasynth.training.identity_config import IdentityTrainConfig

ADAPTER_NAME = "lorasynth_identity"


# --------------------------------------------------------------------------- targets / layout


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` of every ``nn.Linear`` of ``model`` whose name ends with a target."""
    return {
        name: tuple(mod.weight.shape)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _matches(name, targets)
    }


def target_modules(pipe, cfg: IdentityTrainConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per component (``"unet"``, ``"text_encoder"``): the module paths peft will wrap, with shapes.

    Raises LayoutError if the targets match nothing in the UNet.
    """
    out = {"unet": _linear_targets(pipe.unet, cfg.targets)}
    if not out["unet"]:
        raise LayoutError(f"no Linear module of the UNet ends with any of the targets {cfg.targets}")
    if cfg.train_text_encoder:
        out["text_encoder"] = _linear_targets(pipe.text_encoder, cfg.text_encoder_targets)
        if not out["text_encoder"]:
            raise LayoutError(f"no Linear module of the text encoder ends with any of {cfg.text_encoder_targets}")
    return out


def lora_name(component: str, path: str) -> str:
    """Canonical LoRA module name (``unet.<path>``; text encoder paths keep ``text_model.``)."""
    return f"{component}.{file_path(component, path)}"


def identity_layout(pipe, cfg: IdentityTrainConfig) -> Layout:
    """The layout every LoRA trained with ``cfg`` on ``pipe`` has (sorted module names)."""
    specs = [
        ModuleSpec.for_weight(lora_name(component, path), shape, cfg.rank)
        for component, modules in target_modules(pipe, cfg).items()
        for path, shape in modules.items()
    ]
    return Layout(tuple(sorted(specs, key=lambda s: s.name)))


# --------------------------------------------------------------------------- peft injection / extraction


def _has_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def inject_lora(model: nn.Module, module_paths: Iterable[str], rank: int, alpha: float, seed: int | None = None):
    """Wrap ``module_paths`` of ``model`` with a trainable peft LoRA (in place); returns the peft tuner.

    The LoRA starts as peft's ``"gaussian"`` init (A ~ N(0, 1/r), B = 0: the model's output is
    unchanged); ``seed`` makes A reproducible. Every other parameter of ``model`` is frozen.
    Undo with ``tuner.unload()`` (:func:`remove_lora`).
    """
    from peft import LoraConfig, LoraModel

    paths = sorted(module_paths)
    if _has_adapters(model):
        raise ModelError(
            f"the {type(model).__name__} already carries peft/LoRA adapters; train on a clean base model "
            "(do not load LoRAs into the pipeline before training)"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0,
                        init_lora_weights="gaussian", bias="none")
    model.requires_grad_(False)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tuner = LoraModel(model, config, ADAPTER_NAME)
    else:
        tuner = LoraModel(model, config, ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name)
    return tuner


def remove_lora(tuner) -> None:
    """Take the peft layers out again (the original modules come back, untouched)."""
    tuner.unload()


def extract_lora(model: nn.Module, component: str) -> dict[str, LoRAModule]:
    """The peft adapter of ``model`` as canonical modules ``{component.path: LoRAModule}``.

    ``down = lora_A`` (r x in), ``up = lora_B`` (out x r), ``alpha = scaling * r``, i.e. the
    ``lora_alpha`` peft scales by: ``delta W = alpha / r * up @ down`` is exactly peft's update.
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, LoRAModule] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or ADAPTER_NAME not in mod.lora_A:
            continue
        if mod.use_dora.get(ADAPTER_NAME, False):
            raise ModelError(f"{path}: DoRA adapters cannot be expressed as a plain LoRA")
        down = mod.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
        up = mod.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
        alpha = float(mod.scaling[ADAPTER_NAME]) * down.shape[0]
        out[lora_name(component, path)] = LoRAModule(down.contiguous(), up.contiguous(), alpha)
    return out
