"""Tests for the CLIP tokenizer builder, the tiny SD1.5 pipeline, loading, generation and PNG metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lorasynth.errors import LorasynthError, ModelError
from lorasynth.runtime.pipeline import (
    SCHEDULERS,
    GenerationSettings,
    generate,
    load_pipeline,
    read_png_metadata,
    save_png,
    set_scheduler,
)
from lorasynth.worlds.tiny_sd import MARKER_FILE, build_sd_pipeline, read_tiny_marker
from lorasynth.runtime.tokenizer import build_clip_tokenizer_files, check_tokenizer

PROMPT = "a photo of a cat"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]

# The real SD1.5 configs (runwayml/stable-diffusion-v1-5 unet/config.json, text_encoder/config.json).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)
from lorasynth.core.sd15 import SD15_TEXT_ENCODER_CONFIG as SD15_TEXT_CONFIG  # noqa: E402


def _settings(**kw) -> GenerationSettings:
    """Small, fast settings: 64x64, 3 steps."""
    return GenerationSettings(**{"prompt": PROMPT, "steps": 3, "width": 64, "height": 64, **kw})


def _linear_names(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# --- tokenizer ---------------------------------------------------------------------------


def test_clip_tokenizer_files_give_sd15_ids(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(tmp_path))
    assert len(tok) == 49408
    assert tok(PROMPT)["input_ids"] == CAT_IDS
    assert tok.pad_token_id == 49407
    assert tok.model_max_length == 77
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length)["input_ids"]
    assert len(padded) == 77 and padded[-1] == 49407
    check_tokenizer(tok)


def test_check_tokenizer_rejects_broken_tokenizers():
    from transformers import CLIPTokenizer

    # what HF_HUB_OFFLINE=1 silently returns: a placeholder vocabulary
    placeholder = CLIPTokenizer()
    assert placeholder.vocab_size < 10
    with pytest.raises(ModelError, match="only .* tokens"):
        check_tokenizer(placeholder)

    # a large vocabulary that still maps ordinary words to the unknown token
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"junk{i}</w>": i + 2 for i in range(2000)}}
    with pytest.raises(ModelError, match="unknown token"):
        check_tokenizer(CLIPTokenizer(vocab=vocab, merges=[]))


# --- tiny pipeline -----------------------------------------------------------------------


def test_tiny_pipeline_saves_and_loads_back(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    assert (tiny_pipeline_dir / MARKER_FILE).is_file()
    marker = read_tiny_marker(tiny_pipeline_dir)
    assert marker["random_weights"] is True and marker["size"] == "tiny"
    assert (tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_pipeline_dir / "tokenizer" / "vocab.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), local_files_only=True)
    assert pipe.safety_checker is None
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer(PROMPT)["input_ids"] == CAT_IDS
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8


def test_tiny_build_is_cached_and_deterministic(tiny_pipeline_dir, tmp_path):
    weights = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_sd_pipeline(tiny_pipeline_dir, "tiny") == tiny_pipeline_dir
    assert weights.stat().st_mtime_ns == before  # reused, not rebuilt

    # the same seed rebuilt elsewhere gives the same weights
    from safetensors.torch import load_file

    other = build_sd_pipeline(tmp_path / "again", "tiny", seed=0)
    a, b = load_file(weights), load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a different seed replaces the cached build in place
    build_sd_pipeline(other, "tiny", seed=1)
    assert read_tiny_marker(other)["seed"] == 1
    c = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])


def test_tiny_build_refuses_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LorasynthError, match="refusing"):
        build_sd_pipeline(tmp_path, "tiny")
    with pytest.raises(LorasynthError, match="unknown tiny pipeline size"):
        build_sd_pipeline(tmp_path / "x", "huge")


def test_tiny_module_names_are_sd15_module_names(tiny_pipeline):
    """LoRA keys written for the miniature must name real SD1.5 modules (same layer class).

    Block containers may differ (SD1.5's down_blocks.1 has attentions, the miniature's does
    not), so classes are compared for leaf layers only.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        sd15_unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        sd15_text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    assert sum(p.numel() for p in sd15_unet.parameters()) == 859_520_964  # real SD1.5 UNet

    for tiny, real in ((tiny_pipeline.unet, sd15_unet), (tiny_pipeline.text_encoder, sd15_text)):
        tiny_linear, real_linear = _linear_names(tiny), _linear_names(real)
        assert tiny_linear and set(tiny_linear) <= set(real_linear), sorted(set(tiny_linear) - set(real_linear))[:5]
        real_modules = dict(real.named_modules())
        for name, module in tiny.named_modules():
            assert name in real_modules, name
            if not any(module.children()):
                assert type(real_modules[name]) is type(module), name

    # the attention layers a to_q/to_v LoRA touches sit where SD1.5 has them
    attn = {n.rsplit(".transformer_blocks", 1)[0] for n in _linear_names(tiny_pipeline.unet) if n.endswith("attn2.to_v")}
    assert attn == {"down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}


# --- loading -----------------------------------------------------------------------------


def test_load_pipeline_options(tiny_pipeline_dir, tiny_pipeline):
    assert tiny_pipeline.unet.dtype == torch.float32
    assert tiny_pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe = load_pipeline(str(tiny_pipeline_dir), dtype="bf16", channels_last=False)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    with pytest.raises(LorasynthError, match="auto, fp32, bf16"):
        load_pipeline(str(tiny_pipeline_dir), dtype="fp16")


def test_load_missing_or_broken_model_fails_clearly(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(*args, **kwargs):  # local paths must never reach the hub
        raise AssertionError("from_pretrained called for a local path")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_hub)
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelError, match="no such folder") as err:
        load_pipeline(str(missing))
    assert str(missing) in str(err.value) and "model_index.json" in str(err.value)
    assert "\n" not in str(err.value)

    with pytest.raises(ModelError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelError, match="pickle"):
        load_pipeline(str(tmp_path / "model.ckpt"))
    with pytest.raises(ModelError, match="no such file"):
        load_pipeline(str(tmp_path / "model.safetensors"))


def test_load_hub_failure_is_one_clear_line(monkeypatch):
    from diffusers import StableDiffusionPipeline

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore details")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(ModelError, match="offline") as err:
        load_pipeline("some-org/some-model")
    assert "\n" not in str(err.value) and "couldn't connect" in str(err.value)


def test_load_broken_folder(tiny_pipeline_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="incomplete or broken"):
        load_pipeline(str(broken))


# --- generation --------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_generate_is_deterministic(tiny_pipeline, scheduler):
    first = np.asarray(generate(tiny_pipeline, _settings(scheduler=scheduler), progress=False))
    again = np.asarray(generate(tiny_pipeline, _settings(scheduler=scheduler), progress=False))
    other = np.asarray(generate(tiny_pipeline, _settings(scheduler=scheduler, seed=1), progress=False))
    assert first.shape == (64, 64, 3)
    assert type(tiny_pipeline.scheduler) is SCHEDULERS[scheduler]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_scheduler_switching_does_not_drift(tiny_pipeline):
    reference = np.asarray(generate(tiny_pipeline, _settings(scheduler="dpm"), progress=False))
    initial_config = dict(tiny_pipeline.scheduler.config)
    for name in ("lcm", "euler", "ddim"):
        set_scheduler(tiny_pipeline, name)
    assert np.asarray(generate(tiny_pipeline, _settings(scheduler="dpm"), progress=False)).tolist() == reference.tolist()
    assert dict(tiny_pipeline.scheduler.config) == initial_config
    with pytest.raises(LorasynthError, match="dpm, euler, lcm, ddim"):
        set_scheduler(tiny_pipeline, "k_lms")


def test_generate_rejects_bad_settings(tiny_pipeline):
    with pytest.raises(LorasynthError, match="multiple of 8"):
        generate(tiny_pipeline, _settings(width=100))
    with pytest.raises(LorasynthError, match="multiple of 8"):
        generate(tiny_pipeline, _settings(height=0))
    with pytest.raises(LorasynthError, match="steps"):
        generate(tiny_pipeline, _settings(steps=0))
    with pytest.raises(LorasynthError, match="bf16"):
        generate(tiny_pipeline, _settings(dtype="bf16"))  # pipeline is fp32


def test_generate_bf16(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir), dtype="bf16")
    image = generate(pipe, _settings(dtype="bf16"), progress=False)
    assert image.size == (64, 64)


# --- PNG metadata ------------------------------------------------------------------------


def test_png_metadata_round_trips(tiny_pipeline, tmp_path):
    settings = _settings(negative_prompt="blurry", guidance=5.0, seed=7, scheduler="euler")
    image = generate(tiny_pipeline, settings, progress=False)
    extra = {"Model": "tiny_sd", "Lora": "face.safetensors:0.8, style.safetensors:0.5"}
    path = save_png(image, tmp_path / "out" / "img.png", settings, extra)

    assert sorted(p.name for p in path.parent.iterdir()) == ["img.png"]  # no temp file left
    read_settings, read_extra = read_png_metadata(path)
    assert read_settings == settings and read_extra == extra
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(image))
        params = im.text["parameters"]
        payload = json.loads(im.text["lorasynth"])
    assert params.splitlines()[0] == PROMPT
    assert params.splitlines()[1] == "Negative prompt: blurry"
    assert params.splitlines()[2].startswith("Steps: 3, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64")
    assert 'Lora: "face.safetensors:0.8, style.safetensors:0.5"' in params
    assert payload["settings"]["seed"] == 7 and payload["extra"] == extra

    plain = Image.new("RGB", (8, 8))
    plain.save(tmp_path / "plain.png")
    with pytest.raises(LorasynthError, match="no lorasynth metadata"):
        read_png_metadata(tmp_path / "plain.png")

