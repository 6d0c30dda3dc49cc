"""Random-weight Stable Diffusion pipelines with the SD1.5 architecture, built offline.

Real SD1.5 weights (~4 GB) cannot be assumed on a test machine or downloaded here. The tests
and the demo therefore use a *miniature* SD1.5: the same component classes
(``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, the real 49,408-token CLIP
tokenizer, SD1.5's PNDM scheduler config) with tiny widths and random weights drawn from a
fixed seed. Images it produces show the mechanics (LoRA loading, blending, determinism,
metadata), not image quality: a ``lorasynth_tiny.json`` marker in the folder says so.

Every module path of the miniature exists in the real SD1.5 tree (two UNet levels instead of
four: ``down_blocks.0`` and ``up_blocks.1`` carry the cross-attention like SD1.5's, plus
``mid_block.attentions.0``; text encoder layers 0-1 of 12), so a LoRA key written for the
miniature names a real SD1.5 module, and an SD1.5 LoRA's keys for those blocks resolve against
the miniature (shapes differ, of course).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lorasynth.errors import LorasynthError
from lorasynth.core.safe_io import read_json
from lorasynth.errors import FormatError
from lorasynth.runtime.tokenizer import VOCAB_SIZE, build_clip_tokenizer_files

#: Bump when the architecture or the build changes, so cached builds are rebuilt.
BUILDER_VERSION = 1
MARKER_FILE = "lorasynth_tiny.json"

#: Per size: UNet/VAE widths, text encoder width and depth. ``sample_size`` is the default
#: latent size (8 -> 64 px images with the 8x VAE).
SIZES: dict[str, dict] = {
    "tiny": dict(unet_channels=(32, 64), vae_channels=(32, 32, 32, 32), text_hidden=32, text_layers=2, sample_size=8),
    "small": dict(unet_channels=(64, 128), vae_channels=(32, 32, 64, 64), text_hidden=64, text_layers=2, sample_size=8),
}

#: SD1.5's scheduler_config.json (PNDM), so scheduler swaps behave as on the real model.
SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)

_COMPONENT_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
)


def _marker(size: str, seed: int) -> dict:
    return {
        "builder": "lorasynth.worlds.tiny_sd.build_sd_pipeline",
        "builder_version": BUILDER_VERSION,
        "size": size,
        "seed": seed,
        "random_weights": True,
        "note": "Random weights with the SD1.5 architecture: images show mechanics, not quality.",
    }


def read_tiny_marker(folder: str | Path) -> dict | None:
    """Return the ``lorasynth_tiny.json`` marker of a model folder, or None if it has none.

    Use it to tell users plainly that a base model has random weights.
    """
    path = Path(folder) / MARKER_FILE
    try:
        return read_json(path) if path.is_file() else None
    except FormatError:
        return None


def _is_complete(folder: Path, size: str, seed: int) -> bool:
    marker = read_tiny_marker(folder)
    if marker is None:
        return False
    same = all(marker.get(k) == v for k, v in _marker(size, seed).items() if k != "note")
    return same and all((folder / f).is_file() for f in _COMPONENT_FILES)


@contextlib.contextmanager
def _quiet_transformers_progress():
    """Hide transformers' "Writing model shards" bar while saving, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_components(size: str, seed: int, tokenizer_dir: Path):
    """Instantiate the pipeline with random weights drawn from ``seed``."""
    import torch

    # a private RNG stream: the caller's global torch RNG state is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _instantiate(SIZES[size], tokenizer_dir)


def _instantiate(cfg: dict, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(
        sample_size=cfg["sample_size"],
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=cfg["unet_channels"],
        layers_per_block=1,
        attention_head_dim=8,  # SD1.5's value (diffusers' name for the number of heads)
        cross_attention_dim=cfg["text_hidden"],
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels: the 8x downscale of SD1.5
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=cfg["vae_channels"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, *cfg["vae_channels"]),
        sample_size=cfg["sample_size"] * 8,
        scaling_factor=0.18215,
    )
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_size=cfg["text_hidden"],
        intermediate_size=cfg["text_hidden"] * 4,
        num_hidden_layers=cfg["text_layers"],
        num_attention_heads=4,
        projection_dim=cfg["text_hidden"],
        hidden_act="quick_gelu",  # as OpenAI CLIP ViT-L/14
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd_pipeline(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save a random-weight SD1.5-architecture pipeline; reuse a matching cached build.

    Args:
        out_dir: folder to hold the diffusers pipeline (``save_pretrained`` layout,
            safetensors). It must be absent, empty, or a previous build of this function.
        size: ``"tiny"`` (tests: builds and saves in well under 5 s) or ``"small"`` (demo:
            a 64x64 image in about a second on 2 CPU cores).
        seed: seed of the random weights; the same (size, seed) gives the same weights.

    Returns:
        ``out_dir`` as a Path, loadable with ``StableDiffusionPipeline.from_pretrained`` or
        :func:`lorasynth.runtime.pipeline.load_pipeline`.

    The build is written to a temporary sibling folder and renamed into place, so a folder
    with a marker is always complete, even if the process dies or two processes race.
    """
    if size not in SIZES:
        raise LorasynthError(f"unknown tiny pipeline size {size!r}; valid: {', '.join(SIZES)}")
    out = Path(out_dir).expanduser().resolve()
    if _is_complete(out, size, seed):
        return out
    if out.exists() and any(out.iterdir()) and read_tiny_marker(out) is None:
        raise LorasynthError(f"refusing to build a tiny pipeline into {out}: it is not empty and not a lorasynth tiny build")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        tokenizer_dir = build_clip_tokenizer_files(tmp / "tokenizer")
        pipe = _build_components(size, seed, tokenizer_dir)
        with _quiet_transformers_progress():
            pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
        # keep SD1.5's tokenizer layout (vocab.json + merges.txt, no tokenizer.json) so that
        # transformers 4.x and 5.x both load it
        shutil.rmtree(tmp / "pipe" / "tokenizer")
        os.replace(tokenizer_dir, tmp / "pipe" / "tokenizer")
        (tmp / "pipe" / MARKER_FILE).write_text(json.dumps(_marker(size, seed), indent=2), encoding="utf-8")
        _move_into_place(tmp / "pipe", out, size, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(built: Path, out: Path, size: str, seed: int) -> None:
    """Rename ``built`` to ``out``, replacing an empty folder or an outdated tiny build."""
    if out.exists():
        if any(out.iterdir()):  # an outdated build (checked by the caller): move it aside, delete it
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        else:
            out.rmdir()
    try:
        os.replace(built, out)
    except OSError:
        if not _is_complete(out, size, seed):  # unless a concurrent identical build won the race
            raise
