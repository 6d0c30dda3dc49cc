"""kohya / A1111 / ComfyUI layout: ``lora_unet_<path_with_underscores>.lora_down.weight``.

Tensors per module: ``lora_down.weight`` (r x in), ``lora_up.weight`` (out x r), 0-d
``alpha``; scale = alpha / r, and no alpha means scale 1. This is the file most
likely to load everywhere, so it is lorasynth's default output.

The writer gives every module of a file the same ``alpha`` and folds each module's own
``alpha / rank`` into ``lora_up``: diffusers' ``load_lora_weights`` takes one alpha for its
attention and text-encoder modules (the file's most common one), so a file whose alphas
differ per module is applied wrongly there; with one alpha, diffusers, ComfyUI and A1111
all apply exactly ``(alpha_i / r_i) up_i @ down_i``.

diffusers (0.42) cannot load a kohya file whose text-encoder attention LoRA has no
``out_proj`` module (it infers the key style from ``to_out_lora`` and raises "Could not
automatically infer state dict type"). The writer then adds one all-zero rank-1 ``out_proj``
module (a no-op everywhere), lists it in ``lorasynth.placeholder_modules``, and the reader
drops it again.

The reader also accepts the original Stability (SGM) module names some trainers write
(``lora_unet_input_blocks_1_1_…``), and skips A1111's bundled textual-inversion embeddings
(``bundle_emb.*``) with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorasynth.errors import FormatError
from lorasynth.core.safe_io import parse_json
from lorasynth.core.lora import LoRA, LoRAModule
from lorasynth.formats.common import ALPHA, DOWN, UP, group_factors, make_module, most_common, tensor_alpha, warn
from lorasynth.formats.keys import ModuleTree, kohya_name, sd15_tree, some
from lorasynth.formats.metadata import carried_metadata

_SUFFIXES = {".lora_down.weight": DOWN, ".lora_up.weight": UP, ".alpha": ALPHA}
#: metadata key listing the all-zero modules the writer added for diffusers' sake (see above)
PLACEHOLDER_KEY = "lorasynth.placeholder_modules"
#: A1111 stores textual-inversion embeddings bundled into a LoRA under this prefix.
BUNDLE_PREFIX = "bundle_emb."


def _parse(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def drop_bundled_embeddings(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Remove ``bundle_emb.*`` tensors (A1111 bundled embeddings), warning that they were skipped."""
    bundled = [k for k in tensors if k.startswith(BUNDLE_PREFIX)]
    if not bundled:
        return tensors
    names = sorted({k[len(BUNDLE_PREFIX):].split(".", 1)[0] for k in bundled})
    warn(f"{source}: skipped {len(names)} bundled textual-inversion embedding(s) ({some(names)}); "
         "lorasynth reads only the LoRA weights")
    return {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}


def read_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, tree: ModuleTree | None = None) -> LoRA:
    tree = tree or sd15_tree()
    groups = group_factors(drop_bundled_embeddings(tensors, source), _parse, source)
    unresolved = [k for k in groups if tree.resolve_kohya(k) is None]
    if unresolved:
        raise FormatError(f"{source}: module names not found in the {tree.label}: {some(unresolved)}")
    modules = {}
    for kname, g in groups.items():
        alpha = tensor_alpha(g[ALPHA], kname, source) if ALPHA in g else None
        name = tree.resolve_kohya(kname)
        if name in modules:
            raise FormatError(f"{source}: module {name} appears twice (as {kname} and another spelling)")
        modules[name] = make_module(kname, g, alpha, source, tree, name)
    meta = dict(metadata)
    for name in _placeholders(meta.pop(PLACEHOLDER_KEY, None)):
        m = modules.get(name)
        if m is not None and not m.up.any() and not m.down.any():
            del modules[name]
    return LoRA(modules, meta).sorted()


def _placeholders(raw: str | None) -> list[str]:
    try:
        names = parse_json(raw, PLACEHOLDER_KEY, list) if raw else []
    except FormatError:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def diffusers_placeholder(lora: LoRA) -> tuple[str, LoRAModule] | None:
    """The zero ``out_proj`` module diffusers needs beside text-encoder q/k/v LoRAs, if any."""
    te = sorted(n for n in lora.modules if n.startswith("text_encoder."))
    qkv = [n for n in te if n.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    if not qkv or any(n.endswith("self_attn.out_proj") for n in te):
        return None
    like = lora.modules[qkv[0]]  # CLIP's q/k/v/out projections are all hidden x hidden
    hidden = like.out_features
    zeros = LoRAModule(like.down.new_zeros(1, hidden), like.up.new_zeros(hidden, 1), 1.0)
    return qkv[0].rsplit(".", 1)[0] + ".out_proj", zeros


def file_alpha(lora: LoRA) -> float:
    """The one alpha a kohya file gets: the most common non-zero module alpha (0 if all are 0)."""
    alphas = [m.alpha for m in lora.modules.values() if m.alpha != 0]
    # as stored (a float32 scalar), so folding uses the very value every reader gets back
    return float(torch.tensor(most_common(alphas), dtype=torch.float32)) if alphas else 0.0


def with_alpha(m: LoRAModule, alpha: float) -> LoRAModule:
    """The same update with ``alpha``: ``up`` scaled by ``m.alpha / alpha`` (computed in float64)."""
    if m.alpha == alpha or alpha == 0:
        return m
    up = (m.up.to(torch.float64) * (m.alpha / alpha)).to(m.up.dtype)
    return LoRAModule(m.down, up, alpha)


def kohya_metadata(lora: LoRA, output_name: str, alpha: float) -> dict[str, str]:
    """kohya ``ss_*`` metadata (all strings), plus the LoRA's own carried-over metadata."""
    ranks = [m.rank for m in lora.modules.values()]
    conv = [m for m in lora.modules.values() if m.is_conv and m.down.shape[2:] != (1, 1)]
    args = {}
    if conv:
        args = {"conv_dim": str(most_common(m.rank for m in conv)), "conv_alpha": f"{alpha:g}"}
    meta = carried_metadata(lora.metadata)
    meta.setdefault("ss_output_name", output_name)
    meta.setdefault("modelspec.title", output_name)
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(most_common(ranks)) if ranks else "0",
            "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps(args),
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.sai_model_spec": "1.0.0",
        }
    )
    return meta


def to_kohya(lora: LoRA, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    alpha = file_alpha(lora)
    modules = dict(lora.modules)
    placeholder = diffusers_placeholder(lora)
    if placeholder is not None:
        modules[placeholder[0]] = placeholder[1]
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        m, k = with_alpha(modules[name], alpha), kohya_name(name)
        tensors[f"{k}.lora_down.weight"] = m.down
        tensors[f"{k}.lora_up.weight"] = m.up
        tensors[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    meta = kohya_metadata(lora, Path(path).stem, alpha)
    if placeholder is not None:
        meta[PLACEHOLDER_KEY] = json.dumps([placeholder[0]])
    return tensors, meta
