"""Fast-by-default generation: dtype detection, the prompt cache, VAE tiling, the tiny decoder and
the few-step path (a distillation LoRA fused with the identity LoRA), on the tiny SD1.5 pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasynth.errors import LorasynthError, ModelError
from lorasynth.runtime.pipeline import GenerationSettings, generate, load_pipeline
from lorasynth.runtime.speed import (
    TILE_ABOVE_PIXELS,
    cpu_has_fast_bf16,
    prompt_embeddings,
    resolve_dtype,
    set_vae_tiling,
)

PROMPT = "a photo of sks person"


def _settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, **kw})


def test_bf16_is_detected_from_the_cpu_flags_or_torch():
    assert cpu_has_fast_bf16(frozenset({"avx512f", "amx_bf16"}), "AVX512")
    assert cpu_has_fast_bf16(frozenset({"avx512_bf16"}), "AVX2")
    assert not cpu_has_fast_bf16(frozenset({"avx512f", "avx2"}), "AVX512")
    assert cpu_has_fast_bf16(frozenset(), "AMX")
    assert resolve_dtype("auto") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_dtype("fp32") == "fp32" and resolve_dtype("bf16") == "bf16"
    with pytest.raises(LorasynthError, match="auto, fp32, bf16"):
        resolve_dtype("fp16")


def test_auto_settings_record_the_dtype_that_ran(tiny_pipeline):
    s = _settings()
    assert s.dtype == "auto"
    generate(tiny_pipeline, s, progress=False)
    assert s.dtype == "fp32"  # the fixture pipeline is fp32: the PNG records what ran


def test_default_pipeline_dtype_follows_the_cpu(tiny_pipeline_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_pipeline(str(tiny_pipeline_dir))
    want = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert pipe.unet.dtype == want and pipe.vae.dtype == want and pipe.text_encoder.dtype == want
    # channels-last weights and PyTorch's fused attention (scaled_dot_product_attention)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())


def test_the_text_encoder_runs_once_per_prompt_and_weights(tiny_pipeline):
    from lorasynth.runtime.apply import fused, pipeline_tree

    calls = []
    hook = tiny_pipeline.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = np.asarray(generate(tiny_pipeline, _settings(seed=3), progress=False))
        n = len(calls)
        assert n >= 1
        again = np.asarray(generate(tiny_pipeline, _settings(seed=3), progress=False))
        assert len(calls) == n and np.array_equal(first, again)  # cached: same pixels, no encoder run
        # a LoRA fused into the text encoder swaps its weights: the embeddings are computed afresh
        tree = pipeline_tree(tiny_pipeline)
        name = next(n for n in tree.shapes if n.startswith("text_encoder.") and n.endswith("q_proj"))
        from helpers import random_lora

        lora = random_lora({name: tree.shapes[name]}, rank=2, alpha=2.0, seed=1)
        with fused(tiny_pipeline, [(lora, 5.0)]):
            changed = np.asarray(generate(tiny_pipeline, _settings(seed=3), progress=False))
        assert len(calls) > n and not np.array_equal(first, changed)
        restored = np.asarray(generate(tiny_pipeline, _settings(seed=3), progress=False))
        assert np.array_equal(first, restored)
    finally:
        hook.remove()


def test_cached_prompt_embeddings_give_the_pixels_of_the_plain_pipeline(tiny_pipeline):
    s = _settings(seed=5, guidance=4.0, negative_prompt="blurry")
    ours = np.asarray(generate(tiny_pipeline, s, progress=False))
    with torch.inference_mode():
        theirs = tiny_pipeline(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0,
                               width=64, height=64, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(ours, np.asarray(theirs))
    pos, neg = prompt_embeddings(tiny_pipeline, PROMPT, "", 1.0)
    assert neg is None  # guidance 1: no classifier-free batch, no negative embeddings


def test_vae_tiles_only_large_images(tiny_pipeline):
    assert not set_vae_tiling(tiny_pipeline, 512, 512) and not tiny_pipeline.vae.use_tiling
    assert set_vae_tiling(tiny_pipeline, 2048, 1024) and tiny_pipeline.vae.use_tiling
    assert 2048 * 1024 > TILE_ABOVE_PIXELS
    set_vae_tiling(tiny_pipeline, 64, 64)
    assert not tiny_pipeline.vae.use_tiling


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A random-weight AutoencoderTiny with TAESD's real architecture (diffusers' default config)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("taesd")
    AutoencoderTiny().save_pretrained(path)
    return path


def test_tiny_decoder_replaces_the_vae(tiny_pipeline_dir, tiny_vae_dir, tmp_path):
    from diffusers import AutoencoderTiny

    pipe = load_pipeline(str(tiny_pipeline_dir), dtype="fp32", tiny_vae=str(tiny_vae_dir))
    assert isinstance(pipe.vae, AutoencoderTiny)
    image = generate(pipe, _settings(), progress=False)
    assert image.size == (64, 64)
    with pytest.raises(ModelError, match="AutoencoderTiny"):
        load_pipeline(str(tiny_pipeline_dir), dtype="fp32", tiny_vae=str(tmp_path))


def test_cli_few_step_path_fuses_the_distillation_lora_with_the_identity_lora(tiny_pipeline_dir, tiny_vae_dir, tmp_path):
    """`generate --lcm-lora`: LCM scheduler, 4 steps, guidance 1 by default, both LoRAs fused as one sum."""
    from lorasynth.apps.cli.main import main
    from lorasynth.formats import save_lora
    from lorasynth.runtime.apply import fused, pipeline_tree
    from lorasynth.runtime.pipeline import read_png_metadata
    from helpers import random_lora

    pipe = load_pipeline(str(tiny_pipeline_dir), dtype="fp32")
    tree = pipeline_tree(pipe)
    unet = {n: s for n, s in tree.shapes.items() if n.startswith("unet.")}
    # a distillation LoRA on every UNet layer (as LCM-LoRA), convolutions included
    assert any(len(s) == 4 and s[-1] == 3 for s in unet.values())
    distill = random_lora(unet, rank=4, alpha=4.0, seed=2)
    identity = random_lora({n: s for n, s in unet.items() if n.endswith(("to_q", "to_v"))}, rank=1, alpha=1.0, seed=3)
    save_lora(distill, tmp_path / "lcm.safetensors")
    save_lora(identity, tmp_path / "me.safetensors")
    out = tmp_path / "fast.png"
    assert main(["generate", "--base", str(tiny_pipeline_dir), "--lora", str(tmp_path / "me.safetensors"),
                 "--lcm-lora", str(tmp_path / "lcm.safetensors") + "=0.5", "--tiny-vae", str(tiny_vae_dir),
                 "--dtype", "fp32", "--prompt", PROMPT, "--width", "64", "--height", "64", "-o", str(out)]) == 0
    settings, extra = read_png_metadata(out)
    assert (settings.scheduler, settings.steps, settings.guidance, settings.dtype) == ("lcm", 4, 1.0, "fp32")
    assert "lcm" in extra["Lora hashes"] and "me" in extra["Lora hashes"]
    # the same image from the Python API: both LoRAs in one fuse, decoded by the tiny VAE
    pipe = load_pipeline(str(tiny_pipeline_dir), dtype="fp32", tiny_vae=str(tiny_vae_dir))
    from lorasynth.formats import load_lora

    loras = [(load_lora(tmp_path / "me.safetensors", tree=tree), 1.0), (load_lora(tmp_path / "lcm.safetensors", tree=tree), 0.5)]
    with fused(pipe, loras):
        api = generate(pipe, _settings(scheduler="lcm", steps=4, guidance=1.0), progress=False)
    from PIL import Image

    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(api))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_tensor_by_tensor_unet_is_the_one_diffusers_loads(tiny_pipeline_dir, dtype):
    from diffusers import UNet2DConditionModel

    from lorasynth.runtime.pipeline import DTYPES
    from lorasynth.runtime.speed import load_unet_lowmem

    ours = load_unet_lowmem(tiny_pipeline_dir, DTYPES[dtype])
    theirs = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet", torch_dtype=DTYPES[dtype])
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == DTYPES[dtype] for k in a)
    assert {k: v for k, v in ours.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in theirs.config.items() if k != "_name_or_path"}
    assert load_unet_lowmem(tiny_pipeline_dir / "unet", DTYPES[dtype]) is None  # not a pipeline folder
