"""Interop matrix: LoRA files lorasynth writes, applied by diffusers, peft and lorasynth itself.

Rows (files written by ``save_lora`` on the tiny SD1.5-architecture model): kohya with one rank
and alpha, kohya with mixed ranks and alphas (what ``blend`` writes), text-encoder q/v only,
conv LoCon, diffusers, peft. Columns (consumers): diffusers ``load_lora_weights`` +
``fuse_lora``; peft ``inject_adapter_in_model`` + ``merge`` (``PeftModel`` for a peft folder);
lorasynth ``fuse``. In every cell, every module's fused delta must equal
``alpha / rank * up @ down`` as read straight from the file (by the small independent parser
below, not by lorasynth) to 1e-5 in fp32, and no other weight may change: nothing is
silently dropped and nothing is applied at the wrong scale.

A consumer that cannot read a layout gets the file lorasynth converts for it, as a user
would run ``lorasynth convert``: diffusers ignores peft files (-> kohya), peft has no reader
for kohya/diffusers files (-> diffusers layout, whose header holds the LoraConfig per
component, injected with peft into the UNet and the text encoder).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorasynth.runtime.apply import fused, pipeline_tree
from lorasynth.formats import load_lora, save_lora
from lorasynth.formats.keys import kohya_name
from lorasynth.core.lora import LoRA
from lorasynth.core.sd15 import get_layer

from helpers import random_lora

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
TOL = 1e-5


# ----------------------------------------------------------------------------- the rows


def _pick(shapes, suffixes, component=None):
    return {n: s for n, s in shapes.items() if n.endswith(tuple("." + x for x in suffixes))
            and (component is None or n.startswith(component + "."))}


def _mixed(shapes: dict, ranks, alphas, seed: int) -> LoRA:
    """Module i gets ranks[i % len] and alphas[i % len]; deltas of order 0.1 whatever the scale."""
    modules = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        one = random_lora({name: shape}, rank=ranks[i % len(ranks)], alpha=alphas[i % len(alphas)], seed=seed + i)
        m = one.modules[name]
        m.up.mul_(0.01 / m.scale)
        modules[name] = m
    return LoRA(modules)


def build_row(kind: str, shapes: dict) -> tuple[LoRA, str]:
    attention = _pick(shapes, ATTENTION)
    if kind == "kohya_uniform":
        return _mixed(attention, [4], [2.0], 0), "kohya"
    if kind == "kohya_mixed":
        return _mixed(attention, [1, 2, 4, 8], [1.0, 3.0, 8.0, 27.0, 0.5], 10), "kohya"
    if kind == "te_qv":
        return _mixed(_pick(shapes, ("q_proj", "v_proj"), "text_encoder"), [2], [1.0], 20), "kohya"
    if kind == "locon":
        conv = {n: s for n, s in shapes.items() if n.startswith("unet.") and len(s) == 4 and s[2:] == (3, 3)
                and ".resnets." in n}
        assert conv
        return _mixed({**conv, **_pick(shapes, ("to_q",), "unet")}, [2, 4], [1.0, 4.0], 30), "kohya"
    if kind == "diffusers":
        return _mixed(attention, [2, 4], [2.0, 8.0, 27.0], 40), "diffusers"
    if kind == "peft":  # the weights2weights layout: UNet to_q/to_v, rank 1, alpha 27
        return _mixed(_pick(shapes, ("to_q", "to_v"), "unet"), [1], [27.0], 50), "peft"
    raise AssertionError(kind)


ROWS = ["kohya_uniform", "kohya_mixed", "te_qv", "locon", "diffusers", "peft"]
CONSUMERS = ["diffusers", "peft", "lorasynth"]


# ------------------------------------------------- what the file says (independent parser)


def _alpha_for(cfg: dict, path: str) -> float:
    """peft's rule: the longest alpha_pattern key the module path ends with, else lora_alpha."""
    best = None
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if (path == key or path.endswith("." + key)) and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return float(best[1] if best else cfg["lora_alpha"])


def file_deltas(path: Path, fmt: str, shapes: dict) -> dict[str, torch.Tensor]:
    """``{module: alpha / r * up @ down}`` read from the file by its format's documented rules."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    if fmt == "kohya":
        by_kohya = {kohya_name(n): n for n in shapes}
        for key in tensors:
            if key.endswith(".lora_down.weight"):
                base = key[: -len(".lora_down.weight")]
                alpha = tensors.get(base + ".alpha")
                factors[by_kohya[base]] = (tensors[key], tensors[base + ".lora_up.weight"],
                                           None if alpha is None else float(alpha))
    else:
        if fmt == "diffusers":
            flat = json.loads(meta["lora_adapter_metadata"])
            configs = {c: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(c + ".")}
                       for c in ("unet", "text_encoder")}
        else:
            configs = {"unet": json.loads(path.with_name("adapter_config.json").read_text())}
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                base = key[: -len(".lora_A.weight")]
                if fmt == "peft":
                    name = "unet." + base[len("base_model.model."):]
                else:
                    name = base
                component, p = name.split(".", 1)
                factors[name] = (tensors[key], tensors[base + ".lora_B.weight"], _alpha_for(configs[component], p))
    out = {}
    for name, (down, up, alpha) in factors.items():
        r = down.shape[0]
        scale = (alpha if alpha is not None else r) / r
        out[name] = (scale * up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1)).reshape(shapes[name])
    return out


# ----------------------------------------------------------------------------- consumers


def _weights(models: dict, shapes: dict) -> dict[str, torch.Tensor]:
    return {n: get_layer(models[n.split(".", 1)[0]], n.split(".", 1)[0], n.split(".", 1)[1]).weight.detach().double().clone()
            for n in shapes}


def via_lorasynth(pipe, path: Path, fmt: str, tmp_path: Path) -> dict:
    lora = load_lora(path, tree=pipeline_tree(pipe))
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with fused(pipe, [(lora, 1.0)]):
        return _weights(models, pipeline_tree(pipe).shapes)


def via_diffusers(pipe, path: Path, fmt: str, tmp_path: Path) -> dict:
    if fmt == "peft":  # diffusers' SD loader ignores peft keys: convert first, as the README says
        path = save_lora(load_lora(path, tree=pipeline_tree(pipe)), tmp_path / "for_diffusers.safetensors")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights
    return _weights({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, pipeline_tree(pipe).shapes)


def via_peft(pipe, path: Path, fmt: str, tmp_path: Path) -> dict:
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    shapes = pipeline_tree(pipe).shapes
    if fmt == "peft":
        model = PeftModel.from_pretrained(pipe.unet, str(path.parent)).merge_and_unload()
        return _weights({"unet": model, "text_encoder": pipe.text_encoder}, shapes)
    # peft reads no kohya files: the diffusers layout carries peft keys and each component's LoraConfig
    d = save_lora(load_lora(path, tree=pipeline_tree(pipe)), tmp_path / "for_peft.safetensors", "diffusers")
    with safe_open(str(d), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        flat = json.loads(f.metadata()["lora_adapter_metadata"])
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for component, model in models.items():
        cfg = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(component + ".")}
        if not cfg:
            continue
        inject_adapter_in_model(LoraConfig(**cfg), model, adapter_name="default")
        state = {}
        for key, t in tensors.items():
            if key.startswith(component + "."):
                k = key[len(component) + 1:]
                if component == "text_encoder" and not hasattr(model, "text_model"):
                    k = k.removeprefix("text_model.")
                state[k] = t
        result = set_peft_model_state_dict(model, state, adapter_name="default")
        assert not result.unexpected_keys, result.unexpected_keys[:3]
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge(adapter_names=["default"])
    return _weights(models, shapes)


CONSUMER_FUNCS = {"diffusers": via_diffusers, "peft": via_peft, "lorasynth": via_lorasynth}


# ----------------------------------------------------------------------------- the matrix


@pytest.fixture(scope="module")
def base_pipe(tiny_pipeline_dir):
    from lorasynth.runtime.pipeline import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir), dtype="fp32")


@pytest.fixture(scope="module")
def row_files(base_pipe, tmp_path_factory):
    shapes = pipeline_tree(base_pipe).shapes
    root = tmp_path_factory.mktemp("interop")
    files = {}
    for kind in ROWS:
        lora, fmt = build_row(kind, shapes)
        target = root / kind / ("adapter" if fmt == "peft" else f"{kind}.safetensors")
        files[kind] = (save_lora(lora, target, fmt), fmt, lora)
    return files


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("kind", ROWS)
def test_every_module_applied_exactly(kind, consumer, base_pipe, row_files, tmp_path):
    path, fmt, lora = row_files[kind]
    pipe = copy.deepcopy(base_pipe)
    shapes = pipeline_tree(pipe).shapes
    before = _weights({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, shapes)
    expected = file_deltas(path, fmt, shapes)
    # the file says what lorasynth meant (the writer's folding of alpha/rank is exact)
    assert set(expected) >= set(lora.modules)
    for name, m in lora.modules.items():
        assert (expected[name] - m.delta(torch.float64)).abs().max().item() < 1e-6, name
    after = CONSUMER_FUNCS[consumer](pipe, path, fmt, tmp_path)
    wrong = {}
    for name in shapes:
        got = after[name] - before[name]
        want = expected.get(name, torch.zeros_like(got))
        err = (got - want).abs().max().item()
        if err > TOL:
            wrong[name] = err
    assert not wrong, f"{len(wrong)} of {len(expected)} modules wrong: {sorted(wrong.items())[:3]}"
    assert sum(bool(e.abs().max() > 0) for e in expected.values()) >= len(lora.modules) > 0


def test_text_encoder_peft_adapter_loads_in_peft(base_pipe, tmp_path):
    """A text-encoder-only peft adapter: ``PeftModel.from_pretrained(text_encoder, folder)`` applies every module."""
    from peft import PeftModel

    pipe = copy.deepcopy(base_pipe)
    shapes = pipeline_tree(pipe).shapes
    lora = _mixed(_pick(shapes, ("q_proj", "v_proj"), "text_encoder"), [1, 2], [27.0, 4.0], 60)
    save_lora(lora, tmp_path / "te", "peft")
    assert max((load_lora(tmp_path / "te", tree=pipeline_tree(pipe)).modules[n].delta() - m.delta()).abs().max().item()
               for n, m in lora.modules.items()) == 0
    before = _weights({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, shapes)
    te = PeftModel.from_pretrained(pipe.text_encoder, str(tmp_path / "te")).merge_and_unload()
    after = _weights({"unet": pipe.unet, "text_encoder": te}, shapes)
    for name in shapes:
        want = lora.modules[name].delta(torch.float64) if name in lora.modules else 0
        assert (after[name] - before[name] - want).abs().max().item() <= TOL, name
