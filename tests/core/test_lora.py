import torch
import pytest

from lorasynth.errors import FormatError, LayoutError
from lorasynth.core.layout import Layout, ModuleSpec
from lorasynth.core.lora import LoRA, LoRAModule, canonicalize_module
from lorasynth.core.sd15 import build_sd15_module_shapes, sd15_module_shapes

from helpers import ATTN, random_lora, sd15_lora


def test_shipped_sd15_table_matches_diffusers_module_tree():
    assert sd15_module_shapes() == build_sd15_module_shapes()
    assert len([n for n in sd15_module_shapes() if n.startswith("unet.")]) == 282


def test_delta_uses_alpha_over_rank():
    m = LoRAModule(torch.ones(2, 3), torch.ones(4, 2), alpha=1.0)
    assert torch.allclose(m.delta(), torch.full((4, 3), 1.0))  # scale 0.5 * (sum over rank 2)


def test_rank_mismatch_is_refused():
    with pytest.raises(FormatError, match="rank mismatch"):
        LoRAModule(torch.ones(2, 3), torch.ones(4, 3), 1.0)


def test_canonical_form_removes_factor_ambiguity():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(40, 4, generator=g, dtype=torch.float64)
    a = torch.randn(4, 30, generator=g, dtype=torch.float64)
    r = torch.randn(4, 4, generator=g, dtype=torch.float64)
    m1 = LoRAModule(a, b, alpha=4.0)
    m2 = LoRAModule(torch.linalg.solve(r, a), b @ r, alpha=8.0)  # same update up to the scale
    m2 = LoRAModule(m2.down, m2.up / 2, alpha=8.0)
    c1, c2 = canonicalize_module(m1), canonicalize_module(m2)
    assert torch.allclose(c1.down, c2.down, atol=1e-9) and torch.allclose(c1.up, c2.up, atol=1e-9)
    assert torch.allclose(c1.delta(torch.float64), m1.delta(torch.float64), atol=1e-9)
    assert c1.alpha == c1.rank
    # sign rule: the largest-magnitude entry of every up column is positive
    idx = c1.up.abs().argmax(dim=0)
    assert (c1.up[idx, torch.arange(4)] > 0).all()


def test_canonical_conv_module_keeps_its_update():
    lora = random_lora({"unet.conv_in": (320, 4, 3, 3)}, rank=2, dtype=torch.float64)
    m = lora.modules["unet.conv_in"]
    c = canonicalize_module(m)
    assert c.down.shape == (2, 4, 3, 3) and c.up.shape == (320, 2, 1, 1)
    assert torch.allclose(c.delta(torch.float64), m.delta(torch.float64), atol=1e-10)


def test_w2w_layout_matches_reference_offsets():
    layout = Layout.w2w()
    assert len(layout) == 64 and layout.size == 99_648
    offsets = list(layout.offsets.values())
    assert offsets[:4] == [0, 640, 1280, 1920] and offsets[-1] == 98_560
    assert layout.names[0] == f"{ATTN}.attn1.to_q"


def test_layout_json_round_trip_and_stable_signature():
    layout = Layout.w2w()
    again = Layout.from_json(layout.to_json())
    assert again == layout and again.signature == layout.signature
    other = Layout(layout.modules[:-1])
    assert other.signature != layout.signature


def test_flatten_unflatten_round_trip_raw_and_canonical():
    layout = Layout.w2w()
    v = torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
    lora = layout.unflatten(v, alpha=27.0)
    assert torch.equal(layout.flatten(lora, canonical=False), v)
    canon = layout.flatten(lora, canonical=True)
    back = layout.unflatten(canon)  # alpha = rank
    for n in layout.names[:8]:
        assert torch.allclose(back.modules[n].delta(), lora.modules[n].delta(), rtol=1e-4, atol=1e-3)
    # canonical vector is invariant to factor rescaling (B c, A / c)
    scaled = LoRA({n: LoRAModule(m.down / 3.0, m.up * 3.0, m.alpha) for n, m in lora.modules.items()})
    assert torch.allclose(layout.flatten(scaled, canonical=True), canon, atol=1e-5)


def test_layout_mismatch_names_the_problem():
    layout = Layout.w2w()
    lora = sd15_lora([f"{ATTN}.attn1.to_q", f"{ATTN}.attn1.to_k"], rank=1)
    why = layout.mismatch(lora)
    assert "missing" in why and "attn1.to_k" in why
    with pytest.raises(LayoutError, match="does not fit layout"):
        layout.flatten(lora)
    wrong_rank = sd15_lora(layout.names, rank=2)
    assert "layout expects (1, 320)" in layout.mismatch(wrong_rank)


def test_module_spec_for_conv_weight():
    spec = ModuleSpec.for_weight("unet.conv_in", (320, 4, 3, 3), 2)
    assert spec.down_shape == (2, 4, 3, 3) and spec.up_shape == (320, 2, 1, 1) and spec.size == 72 + 640
