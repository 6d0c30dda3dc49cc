"""How one identity LoRA is trained (:class:`IdentityTrainConfig`), importable without torch.

Kept apart from :mod:`lorasynth.training.identity_lora` (torch, Lightning, peft, diffusers) so the
CLI can show the defaults in ``--help`` without importing the training stack.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lorasynth.errors import LorasynthError

DTYPES = ("fp32", "bf16")


@dataclass
class IdentityTrainConfig:
    """How one identity LoRA is trained. Defaults reproduce the weights2weights recipe.

    rank, alpha, targets: the LoRA (peft ``r``, ``lora_alpha``, and module-name suffixes:
        ``"to_q"`` matches ``attn1.to_q`` and ``attn2.to_q`` of every transformer block;
        ``"attn2.to_v"`` would match only the cross-attention values).
    prompt: the DreamBooth instance prompt ("sks" is the rare token that becomes the person).
    steps, lr, batch_size, weight_decay, max_grad_norm: AdamW with a constant learning rate
        and gradient clipping, as diffusers' DreamBooth-LoRA script; ``batch_size`` photos
        (drawn with replacement) per step.
    resolution: training image size in pixels (multiple of 8); photos are center-cropped.
    seed: seeds the LoRA initialisation, the photo order and the noise.
    prior_preservation, class_prompt, num_class_images, class_steps, class_images_dir,
        prior_loss_weight: DreamBooth prior preservation (see the module docstring).
    train_text_encoder, text_encoder_targets: also train a LoRA on the CLIP text encoder's
        attention (its modules are ``text_encoder.text_model.encoder.layers.N.self_attn.*``;
        such a LoRA no longer fits the w2w layout, which is UNet-only).
    dtype: ``"fp32"`` or ``"bf16"``; only used when the base model is loaded from a path
        (a pipeline passed in is trained in its own dtype). LoRA weights are always fp32.
    devices, accelerator, strategy, num_nodes, precision: passed to Lightning (``"auto"`` =
        one CPU process, or the GPUs). Under DDP ``batch_size`` is per device: a step then
        uses ``batch_size x devices x num_nodes`` photos, and ``steps`` counts those steps.
    progress, log_every, ckpt_every: Lightning progress bar, CSV log interval, checkpoint
        interval (checkpoints hold only the LoRA and optimizer state, never the UNet).
    """

    rank: int = 1
    alpha: float = 27.0
    targets: tuple[str, ...] = ("to_q", "to_v")
    prompt: str = "a photo of sks person"
    steps: int = 800
    lr: float = 1e-4
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    prior_preservation: bool = False
    class_prompt: str = "a photo of person"
    num_class_images: int = 50
    class_steps: int = 25
    class_images_dir: str | None = None
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    dtype: str = "fp32"
    devices: int | str | list[int] = "auto"
    accelerator: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    progress: bool = True
    log_every: int = 10
    ckpt_every: int = 200

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.text_encoder_targets = tuple(self.text_encoder_targets)
        if self.rank < 1:
            raise LorasynthError(f"rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise LorasynthError(f"alpha must be a positive number, got {self.alpha}")
        if not self.targets:
            raise LorasynthError("targets must name at least one module suffix (e.g. to_q, to_v)")
        if self.steps < 1:
            raise LorasynthError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise LorasynthError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise LorasynthError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resolution < 8 or self.resolution % 8:
            raise LorasynthError(f"resolution must be a positive multiple of 8 (the VAE downscales by 8), got {self.resolution}")
        if self.dtype not in DTYPES:
            raise LorasynthError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.prior_preservation and self.class_images_dir is None and self.num_class_images < 1:
            raise LorasynthError("prior preservation needs num_class_images >= 1 (or class_images_dir)")

    def to_dict(self) -> dict:
        return asdict(self)

    def train_config(self):
        """The shared Lightning settings (:class:`lorasynth.training.lightning.TrainConfig`) for this run."""
        from lorasynth.training.lightning import TrainConfig

        return TrainConfig(
            max_steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            devices=self.devices,
            accelerator=self.accelerator,
            strategy=self.strategy,
            num_nodes=self.num_nodes,
            precision=self.precision,
            seed=self.seed,
            log_every=self.log_every,
            progress=self.progress,
            ckpt_every=self.ckpt_every,
            grad_clip=self.max_grad_norm,
        )
