import json

import pytest
import torch
from safetensors.torch import save_file

from lorasynth.runtime.apply import fuse, fused, pipeline_tree
from lorasynth.errors import LayoutError
from lorasynth.formats import load_lora, save_lora
from lorasynth.core.lora import LoRA

from helpers import random_lora


# diffusers 0.42 cannot load a kohya text-encoder LoRA that lacks out_proj (its key-style
# inference looks for "to_out_lora"), so the parity test targets all four attention projections.
def _targets(pipe, suffixes=("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")):
    shapes = pipeline_tree(pipe).shapes
    return {n: s for n, s in shapes.items() if n.endswith(tuple("." + x for x in suffixes))}


def _weights(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _lora_for(pipe, seed=0, rank=4, alpha=2.0):
    lora = random_lora(_targets(pipe), rank=rank, alpha=alpha, seed=seed)
    for m in lora.modules.values():
        m.up.mul_(0.01)
    return lora


def test_tiny_pipeline_lora_covers_unet_and_text_encoder(tiny_pipeline):
    names = _targets(tiny_pipeline)
    assert any(n.startswith("unet.") for n in names) and any(n.startswith("text_encoder.text_model.") for n in names)


def test_matches_diffusers_load_and_fuse(tiny_pipeline_dir, tmp_path):
    from lorasynth.runtime.pipeline import load_pipeline

    ours = load_pipeline(str(tiny_pipeline_dir), dtype="fp32")
    path = save_lora(_lora_for(ours), tmp_path / "k.safetensors")
    lora = load_lora(path, tree=pipeline_tree(ours))
    fuse(ours, [(lora, 0.8)])

    theirs = load_pipeline(str(tiny_pipeline_dir), dtype="fp32")
    theirs.load_lora_weights(str(tmp_path), weight_name="k.safetensors", adapter_name="x")
    theirs.fuse_lora(lora_scale=0.8)
    theirs.unload_lora_weights()  # keeps the fused weights, drops the peft layers

    a, b = _weights(ours), _weights(theirs)
    changed = 0
    for name in lora.modules:
        key = name.replace("text_encoder.text_model.", "text_encoder.") + ".weight"
        if key not in a:
            key = name + ".weight"
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= 1e-5, (name, diff)
        changed += 1
    assert changed == len(lora.modules) > 10


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_restore_is_bit_exact(tiny_pipeline_dir, dtype):
    from lorasynth.runtime.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir), dtype=dtype)
    before = _weights(pipe)
    lora = _lora_for(pipe)
    handle = fuse(pipe, [(lora, 1.0), (_lora_for(pipe, seed=3), -0.5)])
    during = _weights(pipe)
    assert any(not torch.equal(during[k], before[k]) for k in before)
    handle.restore()
    after = _weights(pipe)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)


def test_several_loras_with_scales_add_up(tiny_pipeline):
    a, b = _lora_for(tiny_pipeline, seed=1), _lora_for(tiny_pipeline, seed=2)
    name = next(n for n in a.modules if n.startswith("unet."))
    w0 = tiny_pipeline.unet.get_submodule(name.split(".", 1)[1]).weight.detach().clone()
    with fused(tiny_pipeline, [(a, 0.7), (b, -0.3)]):
        w = tiny_pipeline.unet.get_submodule(name.split(".", 1)[1]).weight
        want = w0 + 0.7 * a.modules[name].delta() - 0.3 * b.modules[name].delta()
        assert torch.allclose(w, want, atol=1e-6)
    assert torch.equal(tiny_pipeline.unet.get_submodule(name.split(".", 1)[1]).weight, w0)


def test_peft_file_is_applied_with_its_alpha(tiny_pipeline, tmp_path):
    lora = _lora_for(tiny_pipeline, rank=2, alpha=2.0)
    unet_only = {n: m for n, m in lora.modules.items() if n.startswith("unet.")}
    tensors = {}
    for n, m in unet_only.items():
        tensors[f"base_model.model.{n.split('.', 1)[1]}.lora_A.weight"] = m.down
        tensors[f"base_model.model.{n.split('.', 1)[1]}.lora_B.weight"] = m.up
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 27}))
    loaded = load_lora(tmp_path / "adapter_model.safetensors", tree=pipeline_tree(tiny_pipeline))
    name = next(iter(unet_only))
    layer = tiny_pipeline.unet.get_submodule(name.split(".", 1)[1])
    w0 = layer.weight.detach().clone()
    with fused(tiny_pipeline, [(loaded, 1.0)]):
        assert torch.allclose(layer.weight, w0 + 13.5 * unet_only[name].up @ unet_only[name].down, atol=1e-6)


def test_conv_lora_is_applied(tiny_pipeline):
    shapes = pipeline_tree(tiny_pipeline).shapes
    lora = random_lora({"unet.conv_in": shapes["unet.conv_in"]}, rank=2, alpha=2.0)
    w0 = tiny_pipeline.unet.conv_in.weight.detach().clone()
    with fused(tiny_pipeline, [(lora, 1.0)]):
        assert torch.allclose(tiny_pipeline.unet.conv_in.weight, w0 + lora.modules["unet.conv_in"].delta(), atol=1e-6)


def test_misfit_lora_is_refused_and_nothing_changes(tiny_pipeline):
    before = _weights(tiny_pipeline)
    good = _lora_for(tiny_pipeline)
    name = next(n for n in good.modules if n.startswith("unet."))
    out, inp = good.modules[name].weight_shape
    bad = random_lora({name: (out * 2, inp)}, seed=9)
    with pytest.raises(LayoutError, match=rf"{name} does not fit the base model: update shape \({out * 2}, {inp}\)"):
        fuse(tiny_pipeline, [(good, 1.0), (bad, 1.0)])
    missing = random_lora({"unet.up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)})
    with pytest.raises(LayoutError, match="does not have: unet.up_blocks.3"):
        fuse(tiny_pipeline, [(missing, 1.0)])
    after = _weights(tiny_pipeline)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fused_lora_changes_generation_and_restore_brings_it_back(tiny_pipeline):
    from lorasynth.runtime.pipeline import GenerationSettings, generate

    s = GenerationSettings(prompt="a photo of sks person", steps=2, width=64, height=64, seed=1)
    base = generate(tiny_pipeline, s, progress=False)
    lora = _lora_for(tiny_pipeline)
    for m in lora.modules.values():
        m.up.mul_(100)
    with fused(tiny_pipeline, [(lora, 1.0)]):
        changed = generate(tiny_pipeline, s, progress=False)
    again = generate(tiny_pipeline, s, progress=False)
    import numpy as np
    assert np.abs(np.asarray(changed, dtype=float) - np.asarray(base, dtype=float)).mean() > 1.0
    assert np.array_equal(np.asarray(again), np.asarray(base))


def test_refusing_reuses_scratch_memory_and_nested_fuses_restore(tiny_pipeline):
    from lorasynth.runtime.apply import release_buffers

    a, b = _lora_for(tiny_pipeline, seed=1), _lora_for(tiny_pipeline, seed=2)
    name = next(n for n in a.modules if n.startswith("unet."))
    layer = tiny_pipeline.unet.get_submodule(name.split(".", 1)[1])
    w0 = layer.weight.detach().clone()
    with fused(tiny_pipeline, [(a, 1.0)]):
        first_ptr = layer.weight.data_ptr()
        with fused(tiny_pipeline, [(b, 1.0)]):  # nested: fuses on top of the fused weight
            assert layer.weight.data_ptr() != first_ptr
            want = w0 + a.modules[name].delta() + b.modules[name].delta()
            assert torch.allclose(layer.weight, want, atol=1e-5)
        assert torch.allclose(layer.weight, w0 + a.modules[name].delta(), atol=1e-6)
    assert torch.equal(layer.weight, w0)
    with fused(tiny_pipeline, [(b, 0.5)]):
        reused = layer.weight.data_ptr()
        assert torch.allclose(layer.weight, w0 + 0.5 * b.modules[name].delta(), atol=1e-6)
    with fused(tiny_pipeline, [(a, 0.5)]):
        assert layer.weight.data_ptr() == reused  # the same memory, written again
    release_buffers(tiny_pipeline)
    assert torch.equal(layer.weight, w0)
