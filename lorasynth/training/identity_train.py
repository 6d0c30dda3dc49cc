"""Train one identity LoRA: the DreamBooth loss, its Lightning module, and :func:`train_identity_lora`.

Steps 1-4 of :mod:`lorasynth.training.identity_lora` for one person: encode the photos and
prompts (:mod:`lorasynth.training.identity_data`), inject a peft LoRA
(:mod:`lorasynth.training.identity_peft`), fit :class:`IdentityLoRAModule` through
:func:`lorasynth.training.lightning.fit`, read the LoRA back and leave the pipeline as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning
import numpy as np
from lightning.pytorch.callbacks import Callback
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from lorasynth.errors import ModelError
from lorasynth.core.lora import LoRA, LoRAModule
from lorasynth.training.lightning import LossCurveCallback, fit, is_global_zero
from lorasynth.training.identity_config import IdentityTrainConfig
from lorasynth.training.identity_data import PhotoLatents, encode_photos, encode_prompt, make_class_latents, tokenize
from lorasynth.training.identity_peft import extract_lora, inject_lora, remove_lora, target_modules

#: Config fields left out of a trained LoRA's recorded recipe (how it ran, not what it learned).
RUNTIME_FIELDS = ("devices", "accelerator", "strategy", "num_nodes", "progress", "log_every", "ckpt_every")


@dataclass
class TrainMetrics:
    """What one identity's training did. Losses are per step; initial/final are smoothed
    (mean of the first / last ``window`` steps, ``window`` = steps // 10, 1 to 20)."""

    initial_loss: float
    final_loss: float
    steps: int
    seconds: float
    seconds_per_step: float
    photos: int
    losses: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, with_losses: bool = False) -> dict:
        d = asdict(self)
        if not with_losses:
            d.pop("losses")
        return d


# --------------------------------------------------------------------------- the Lightning module


def diffusion_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet must predict for the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ModelError(f"unsupported prediction_type {kind!r} (expected epsilon, v_prediction or sample)")


def diffusion_loss(unet, scheduler, latents: Tensor, text: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """MSE of the UNet's prediction on ``latents`` noised with ``noise`` at ``timesteps`` (fp32 loss)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    dtype = unet.dtype
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=text.to(dtype)).sample
    return F.mse_loss(pred.float(), diffusion_target(scheduler, latents, noise, timesteps).float())


class IdentityLoRAModule(lightning.LightningModule):
    """DreamBooth on a frozen UNet carrying a peft LoRA; only the LoRA parameters train.

    Holds the UNet (and the text encoder when it trains too) as submodules, the encoded
    prompt(s) as buffers, and a ``DDPMScheduler`` for noising. Checkpoints keep only the
    trainable (LoRA) tensors: the frozen base never goes to disk.
    """

    def __init__(self, unet: nn.Module, scheduler, prompt_embeds: Tensor, class_embeds: Tensor | None = None,
                 lr: float = 1e-4, weight_decay: float = 1e-2, prior_loss_weight: float = 1.0,
                 text_encoder: nn.Module | None = None, prompt_ids: Tensor | None = None,
                 class_ids: Tensor | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder  # set only when its LoRA trains
        self.scheduler = scheduler
        self.lr, self.weight_decay, self.prior_loss_weight = lr, weight_decay, prior_loss_weight
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("class_embeds", class_embeds, persistent=False)
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("class_ids", class_ids, persistent=False)
        self.strict_loading = False  # checkpoints hold the LoRA only

    def _text(self, embeds: Tensor | None, ids: Tensor | None, batch: int) -> Tensor:
        if self.text_encoder is not None:
            embeds = self.text_encoder(ids)[0]
        return embeds.expand(batch, -1, -1)

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        latents = batch["mean"] + batch["std"] * torch.randn_like(batch["std"])
        n = latents.shape[0]
        text = self._text(self.prompt_embeds, self.prompt_ids, n)
        has_class = "class" in batch
        if has_class:
            latents = torch.cat([latents, batch["class"]])
            text = torch.cat([text, self._text(self.class_embeds, self.class_ids, batch["class"].shape[0])])
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        dtype = self.unet.dtype
        pred = self.unet(noisy.to(dtype), t, encoder_hidden_states=text.to(dtype)).sample.float()
        target = diffusion_target(self.scheduler, latents, noise, t).float()
        loss = F.mse_loss(pred[:n], target[:n])
        if has_class:
            prior = F.mse_loss(pred[n:], target[n:])
            self.log("prior_loss", prior, on_step=True, on_epoch=False, batch_size=n)
            loss = loss + self.prior_loss_weight * prior
        return loss

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["mean"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}


# --------------------------------------------------------------------------- one identity: steps


class _StepTimer(Callback):
    """Wall time and number of the optimizer steps run in this fit (a resumed run counts its own)."""

    def __init__(self) -> None:
        self.steps, self.seconds, self._start = 0, 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start


def load_base_pipeline(pipe_or_base, cfg: IdentityTrainConfig):
    """``pipe_or_base`` itself if it is a pipeline, else the pipeline it names, loaded with ``cfg.dtype``."""
    if isinstance(pipe_or_base, (str, os.PathLike)):
        from lorasynth.runtime.pipeline import load_pipeline

        return load_pipeline(str(pipe_or_base), dtype=cfg.dtype)
    return pipe_or_base


def _smoothed(losses: Sequence[float]) -> tuple[float, float]:
    if not losses:
        return float("nan"), float("nan")
    w = max(1, min(20, len(losses) // 10))
    return float(np.mean(losses[:w])), float(np.mean(losses[-w:]))


def _output_folder(out_dir: str | Path | None) -> tuple[Path | None, str | Path]:
    """``(temporary folder to delete afterwards or None, folder Lightning writes to)``."""
    if out_dir is not None:
        return None, out_dir
    # under DDP only rank 0 writes (Lightning hands its folder to the other ranks)
    tmp = Path(tempfile.mkdtemp(prefix="lorasynth-train-")) if is_global_zero() else None
    return tmp, tmp or Path(tempfile.gettempdir()) / "lorasynth-train-rank-n"


def _trained_models(pipe, cfg: IdentityTrainConfig) -> dict[str, nn.Module]:
    """The components that get a LoRA: the UNet, plus the text encoder with ``cfg.train_text_encoder``."""
    models = {"unet": pipe.unet}
    if cfg.train_text_encoder:
        models["text_encoder"] = pipe.text_encoder
    return models


def _model_state(models: dict[str, nn.Module]) -> dict[str, tuple]:
    """Per component: train/eval mode, device and every parameter's ``requires_grad``, to restore later."""
    return {k: (m.training, m.device, {n: p.requires_grad for n, p in m.named_parameters()}) for k, m in models.items()}


def _restore_models(models: dict[str, nn.Module], saved: dict[str, tuple], tuners: dict[str, Any]) -> None:
    """Remove the adapters and put mode, device and ``requires_grad`` back as :func:`_model_state` saw them."""
    for component, tuner in tuners.items():
        remove_lora(tuner)
    for component, model in models.items():
        training, device, grads = saved[component]
        model.to(device)
        model.train(training)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))


def _lightning_module(pipe, cfg: IdentityTrainConfig, scheduler, prompt_embeds: Tensor, class_embeds: Tensor | None,
                      with_class: bool) -> IdentityLoRAModule:
    """The module to fit; with ``cfg.train_text_encoder`` it re-encodes the prompts' token ids every step."""
    te = pipe.text_encoder if cfg.train_text_encoder else None
    return IdentityLoRAModule(
        pipe.unet, scheduler, prompt_embeds, class_embeds, lr=cfg.lr, weight_decay=cfg.weight_decay,
        prior_loss_weight=cfg.prior_loss_weight, text_encoder=te,
        prompt_ids=tokenize(pipe, cfg.prompt) if te is not None else None,
        class_ids=tokenize(pipe, cfg.class_prompt) if te is not None and with_class else None,
    )


def _fit_module(module: IdentityLoRAModule, dataset: PhotoLatents, cfg: IdentityTrainConfig, out_dir: str | Path,
                resume: bool) -> tuple[Any, _StepTimer, list[float]]:
    """Run Lightning for ``cfg.steps`` steps of photos drawn with replacement; ``(trainer, timer, losses)``."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=cfg.steps * cfg.batch_size,
                            generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=False)
    resume = resume and (Path(out_dir) / "checkpoints" / "last.ckpt").is_file()
    module.train()  # DreamBooth trains in train mode (SD has no dropout/batch-norm: same maths)
    timer = _StepTimer()
    with warnings.catch_warnings():
        # the sampler draws with replacement: restarting it on resume loses nothing
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        trainer = fit(module, loader, out_dir, cfg.train_config(), resume=resume, extra_callbacks=[timer])
    curve = next((c for c in trainer.callbacks if isinstance(c, LossCurveCallback)), None)
    losses = [v for _, v in curve.train] if curve is not None else []
    return trainer, timer, losses


def _trained_lora(modules: dict[str, LoRAModule], cfg: IdentityTrainConfig) -> LoRA:
    """The extracted modules as a LoRA whose metadata records the recipe; refuses NaN/Inf weights."""
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS}
    lora = LoRA(dict(sorted(modules.items())), metadata={
        "lorasynth.trained": "dreambooth-lora",
        "lorasynth.train_config": json.dumps(recipe, default=str),
    })
    lora.check_finite()
    return lora


# --------------------------------------------------------------------------- one identity


def train_identity_lora(
    pipe_or_base,
    photos: Sequence,
    cfg: IdentityTrainConfig | None = None,
    out_dir: str | Path | None = None,
    class_latents: Tensor | None = None,
    resume: bool = False,
) -> tuple[LoRA, TrainMetrics]:
    """Train one identity LoRA on ``photos`` (paths or arrays); returns ``(LoRA, metrics)``.

    ``pipe_or_base``: a loaded ``StableDiffusionPipeline`` (trained in its dtype/device and
    left as it was afterwards: the adapter is removed, train/eval mode and ``requires_grad``
    restored) or a base model path/id (loaded with ``cfg.dtype``).
    ``out_dir``: where Lightning writes ``checkpoints/last.ckpt`` (LoRA + optimizer only),
    ``logs/`` and ``loss_curve.png``; None uses a temporary folder, deleted afterwards.
    ``resume=True`` continues from ``out_dir/checkpoints/last.ckpt`` when it exists.
    ``class_latents``: prior-preservation latents (see :func:`make_class_latents`); made
    here when ``cfg.prior_preservation`` and none are given.

    The LoRA's modules are ``unet.<path>`` (plus ``text_encoder.text_model.<path>`` with
    ``cfg.train_text_encoder``), rank ``cfg.rank``, alpha ``cfg.alpha``; its metadata
    records the recipe.
    """
    from diffusers import DDPMScheduler

    cfg = cfg or IdentityTrainConfig()
    pipe = load_base_pipeline(pipe_or_base, cfg)
    photos = list(photos)
    targets = target_modules(pipe, cfg)  # raises before any work if the targets match nothing
    mean, std = encode_photos(pipe.vae, photos, cfg.resolution)
    if cfg.prior_preservation and class_latents is None:
        class_latents = make_class_latents(pipe, cfg, out_dir)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # encoded before any adapter is injected: the prompts see the base text encoder
    prompt_embeds = encode_prompt(pipe, cfg.prompt)
    class_embeds = encode_prompt(pipe, cfg.class_prompt) if class_latents is not None else None

    tmp, out_dir = _output_folder(out_dir)
    models = _trained_models(pipe, cfg)
    saved = _model_state(models)
    tuners: dict[str, Any] = {}
    try:
        for i, (component, model) in enumerate(models.items()):
            tuners[component] = inject_lora(model, targets[component], cfg.rank, cfg.alpha, seed=cfg.seed + i)
        module = _lightning_module(pipe, cfg, scheduler, prompt_embeds, class_embeds, class_latents is not None)
        trainer, timer, losses = _fit_module(module, PhotoLatents(mean, std, class_latents), cfg, out_dir, resume)
        modules: dict[str, LoRAModule] = {}
        for component, model in models.items():
            modules.update(extract_lora(model, component))
    finally:
        _restore_models(models, saved, tuners)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    initial, final = _smoothed(losses)
    metrics = TrainMetrics(initial, final, int(trainer.global_step), timer.seconds,
                           timer.seconds / max(1, timer.steps), len(photos), losses)
    return _trained_lora(modules, cfg), metrics
