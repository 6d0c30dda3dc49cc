"""What an identity LoRA trains on: photos as VAE latents, prompts as text embeddings.

Photos are center-cropped, resized and encoded by the VAE once (:func:`encode_photos` keeps
the latent distribution's mean and std, so every step can draw a fresh sample); prompts are
encoded once (:func:`encode_prompt`); prior-preservation "class" latents are generated or
encoded once per run (:func:`make_class_latents`); :class:`PhotoLatents` serves them to the
training loop. See :mod:`lorasynth.training.identity_lora` for the whole recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lorasynth.errors import LorasynthError
from lorasynth.training.identity_config import IdentityTrainConfig

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def photos_in(folder: Path) -> list[Path]:
    """The photos of ``folder`` (by suffix, hidden files skipped), sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))


# --------------------------------------------------------------------------- photos -> latents


def preprocess_photo(photo, resolution: int) -> Tensor:
    """One photo (path, array or PIL image) as a 3 x R x R float tensor in [-1, 1].

    The shorter side is resized to ``resolution`` (bicubic), then the center is cropped,
    as DreamBooth's default transform; EXIF orientation and odd modes are handled by
    :func:`lorasynth.faces.read_rgb`.
    """
    from PIL import Image

    from lorasynth.faces import read_rgb

    rgb = read_rgb(photo)
    im = Image.fromarray(rgb)
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_photos(vae, photos: Sequence, resolution: int) -> tuple[Tensor, Tensor]:
    """VAE latent distributions of ``photos``: ``(mean, std)``, each N x 4 x R/8 x R/8, fp32,
    already in UNet space (shifted and multiplied by ``vae.config.scaling_factor``)."""
    if not photos:
        raise LorasynthError("no photos to train on")
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    means, stds = [], []
    for photo in photos:  # one at a time: a 512 px encode already takes GBs on SD1.5
        x = preprocess_photo(photo, resolution)[None].to(device=vae.device, dtype=vae.dtype)
        dist = vae.encode(x).latent_dist
        means.append(((dist.mean.float() - shift) * scale).cpu())
        stds.append((dist.std.float() * scale).cpu())
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------- prompts


def tokenize(pipe, prompt: str) -> Tensor:
    """Token ids (1 x 77) of ``prompt``, padded to the tokenizer's max length as SD1.5 does."""
    return pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompt(pipe, prompt: str) -> Tensor:
    """The text encoder's last hidden state for ``prompt`` (1 x 77 x width), fp32."""
    ids = tokenize(pipe, prompt).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0].float().cpu()


# --------------------------------------------------------------------------- prior preservation


def class_latents_key(pipe_id: str, cfg: IdentityTrainConfig) -> str:
    """Cache key of the prior-preservation latents (base model, prompt, count, steps, seed, size)."""
    parts = [pipe_id, cfg.class_prompt, cfg.num_class_images, cfg.class_steps, cfg.seed, cfg.resolution,
             cfg.class_images_dir]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _encode_class_photos(pipe, cfg: IdentityTrainConfig) -> Tensor:
    """Distribution means of every photo in ``cfg.class_images_dir``."""
    photos = photos_in(Path(cfg.class_images_dir))
    if not photos:
        raise LorasynthError(f"class_images_dir {cfg.class_images_dir} holds no photos")
    return encode_photos(pipe.vae, photos, cfg.resolution)[0]


def _sample_class_latents(pipe, cfg: IdentityTrainConfig) -> Tensor:
    """``cfg.num_class_images`` latents sampled from the base pipeline (seeds ``cfg.seed + i``)."""
    was = getattr(pipe, "_progress_bar_config", {}).copy()
    pipe.set_progress_bar_config(disable=True)
    out = []
    try:
        for i in range(cfg.num_class_images):
            g = torch.Generator("cpu").manual_seed(cfg.seed + i)
            res = pipe(cfg.class_prompt, num_inference_steps=cfg.class_steps, guidance_scale=7.5,
                       height=cfg.resolution, width=cfg.resolution, generator=g, output_type="latent")
            out.append(res.images.float().cpu())
    finally:
        pipe.set_progress_bar_config(**was)
    return torch.cat(out)


def _save_latents(latents: Tensor, cache: Path) -> None:
    """Write ``latents`` to ``cache`` atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    save_file({"latents": latents.contiguous()}, str(tmp))
    os.replace(tmp, cache)


@torch.no_grad()
def make_class_latents(pipe, cfg: IdentityTrainConfig, cache_dir: str | Path | None = None,
                       pipe_id: str = "") -> Tensor:
    """The prior-preservation latents (M x 4 x R/8 x R/8, UNet space), generated or encoded once.

    From ``cfg.class_images_dir`` (every photo in it, VAE-encoded, distribution means) if set,
    else ``cfg.num_class_images`` samples of the base pipeline (its own scheduler,
    ``cfg.class_steps`` steps, guidance 7.5, seeds ``cfg.seed + i``) taken as latents (no
    decode/encode round trip). Must be called before any adapter is injected. With
    ``cache_dir`` the result is stored as ``class_latents-<key>.safetensors`` and reused.
    """
    from safetensors.torch import load_file

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"class_latents-{class_latents_key(pipe_id, cfg)}.safetensors"
        if cache.is_file():
            return load_file(str(cache))["latents"]
    if cfg.class_images_dir is not None:
        latents = _encode_class_photos(pipe, cfg)
    else:
        latents = _sample_class_latents(pipe, cfg)
    if cache is not None:
        _save_latents(latents, cache)
    return latents


class PhotoLatents(Dataset):
    """Training items: an instance latent distribution (mean, std) and, optionally, a class latent.

    Item ``i`` pairs photo ``i % N`` with class latent ``i % M``; the sampler draws indices
    with replacement, so any number of steps is one "epoch".
    """

    def __init__(self, mean: Tensor, std: Tensor, class_latents: Tensor | None = None):
        self.mean, self.std, self.class_latents = mean, std, class_latents

    def __len__(self) -> int:
        return max(len(self.mean), 0 if self.class_latents is None else len(self.class_latents))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"mean": self.mean[i % len(self.mean)], "std": self.std[i % len(self.std)]}
        if self.class_latents is not None:
            item["class"] = self.class_latents[i % len(self.class_latents)]
        return item
