"""Conditional latent diffusion ("the hypernetwork"): face embedding -> LoRA latent.

:class:`HypernetDiffusion` is a LightningModule that

* trains the :class:`~lorasynth.hypernet.model.Denoiser` on (latent, face-embedding) pairs with
  diffusers' ``DDPMScheduler`` noise (``add_noise``, ``get_velocity``), random timesteps and
  condition dropout (for classifier-free guidance), AdamW with warm-up + cosine decay and an
  exponential moving average (EMA) of the weights that sampling and export use;
* samples with diffusers' ``DDIMScheduler`` (eta=0) or ``DPMSolverMultistepScheduler``
  (dpmsolver++), configured with the training schedule and prediction type, so sampling is
  deterministic given a seed; the conditional and null branches of classifier-free guidance
  run as one batch of 2B;
* exports to ``hypernet.safetensors`` + ``hypernet.json`` and loads from them without ever
  unpickling anything.

Latents are standardized per dimension with a mean/std measured on the training latents, and
face embeddings are centred per dimension and divided by one global scale (keeps their
geometry, makes a 128-d unit vector and a 512-d ArcFace vector look alike to the network).
Those statistics are buffers: they travel in checkpoints and in the exported file.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import lightning
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..errors import ModelError
from .model import Denoiser, HypernetConfig

WEIGHTS_FILE = "hypernet.safetensors"
CONFIG_FILE = "hypernet.json"
FORMAT_NAME = "lorasynth-hypernet"
FORMAT_VERSION = 1
SCHEDULERS = ("ddim", "dpm")

#: Sampling defaults, used by ``sample`` and written to ``hypernet.json`` (a CLI reads them there).
#: Tuned on planted worlds (2,000 train / 200 held-out identities): with x0-prediction, 3-5
#: DDIM/DPM steps already match 10-20; guidance 1.0 (the plain conditional model) scored best,
#: guidance >= 1.5 lowered the held-out delta-W cosine (extrapolating past an already sharp
#: conditional). Guidance 1.0 also skips the null branch, halving the sampling cost.
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 1.0
DEFAULT_SCHEDULER = "ddim"

_STAT_KEYS = ("latent_mean", "latent_std", "cond_mean", "cond_scale")


def latent_dataloader(
    latents: Tensor, conds: Tensor, batch_size: int = 256, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """A DataLoader of (latent, condition) float32 pairs for :func:`lorasynth.training.fit`.

    ``drop_last`` when the data is larger than one batch, so every step sees a full batch.
    """
    latents, conds = _as_pairs(latents, conds)
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(latents))
    return DataLoader(
        TensorDataset(latents, conds),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(latents) > batch_size,
        generator=gen,
    )


def _as_pairs(latents: Tensor, conds: Tensor) -> tuple[Tensor, Tensor]:
    latents = torch.as_tensor(latents, dtype=torch.float32)
    conds = torch.as_tensor(conds, dtype=torch.float32)
    if latents.ndim != 2 or conds.ndim != 2 or len(latents) != len(conds):
        raise ModelError(
            f"need latents (N, latent_dim) and conditions (N, cond_dim); got {tuple(latents.shape)} "
            f"and {tuple(conds.shape)}"
        )
    if len(latents) < 2:
        raise ModelError("need at least 2 (latent, condition) pairs to train the hypernetwork")
    return latents, conds


class HypernetDiffusion(lightning.LightningModule):
    """Conditional diffusion over standardized LoRA latents (see module docstring).

    ``lr``/``weight_decay``/``warmup_steps`` set AdamW and its warm-up + cosine schedule (the
    total length is the Trainer's ``max_steps``); ``ema_decay`` (0 disables) is the EMA of the
    weights used for sampling/export (its decay warms up as ``(1+n)/(10+n)`` so short runs are
    not dominated by the random initialization). ``loss_weighting`` is ``"none"`` (plain MSE on
    the prediction target) or ``"min_snr"`` (Min-SNR-5 weighting, Hang et al. 2023).
    Call :meth:`set_data_stats` (or build with :meth:`for_data`) before training.
    """

    def __init__(
        self,
        config: HypernetConfig,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        ema_decay: float = 0.999,
        loss_weighting: str = "none",
    ) -> None:
        super().__init__()
        if loss_weighting not in ("none", "min_snr"):
            raise ModelError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        self.config = config
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.loss_weighting = loss_weighting
        self.net = Denoiser(config)
        self.ema = copy.deepcopy(self.net).requires_grad_(False) if ema_decay > 0 else None
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_std", torch.ones(config.latent_dim))
        self.register_buffer("cond_mean", torch.zeros(config.cond_dim))
        self.register_buffer("cond_scale", torch.ones(()))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.noise_scheduler = DDPMScheduler(**self._schedule_kwargs(), clip_sample=False)
        #: Sampling settings recorded in an exported hypernet.json (filled by :meth:`load`).
        self.sampling_defaults = {"num_steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
                                  "scheduler": DEFAULT_SCHEDULER}

    # ------------------------------------------------------------------ construction / stats
    @classmethod
    def for_data(cls, latents: Tensor, conds: Tensor, config: HypernetConfig | None = None, **kwargs: Any):
        """Module sized for ``latents`` (N, D) and ``conds`` (N, C), with their statistics set.

        ``config`` fields ``latent_dim``/``cond_dim`` are overridden by the data's shapes.
        """
        latents, conds = _as_pairs(latents, conds)
        base = (config or HypernetConfig()).to_dict()
        base.update(latent_dim=latents.shape[1], cond_dim=conds.shape[1])
        module = cls(HypernetConfig.from_dict(base), **kwargs)
        module.set_data_stats(latents, conds)
        return module

    @torch.no_grad()
    def set_data_stats(self, latents: Tensor, conds: Tensor) -> None:
        """Measure the standardization statistics on the training pairs (stored as buffers)."""
        latents, conds = _as_pairs(latents, conds)
        if latents.shape[1] != self.config.latent_dim or conds.shape[1] != self.config.cond_dim:
            raise ModelError(
                f"data is latent {latents.shape[1]}-d / condition {conds.shape[1]}-d but the hypernet "
                f"expects {self.config.latent_dim}-d / {self.config.cond_dim}-d"
            )
        std = latents.std(0)
        # A constant dimension would divide by ~0: floor the std at a small fraction of the typical one.
        floor = max(float(std.median()) * 1e-3, 1e-8)
        self.latent_mean.copy_(latents.mean(0))
        self.latent_std.copy_(std.clamp_min(floor))
        centred = conds - conds.mean(0)
        self.cond_mean.copy_(conds.mean(0))
        self.cond_scale.copy_(centred.pow(2).mean().sqrt().clamp_min(1e-8))

    def normalize_latent(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize_latent(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    def normalize_cond(self, c: Tensor) -> Tensor:
        return (c - self.cond_mean) / self.cond_scale

    def _schedule_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(
            num_train_timesteps=c.num_train_timesteps,
            beta_schedule=c.beta_schedule,
            prediction_type=c.diffusers_prediction_type,
            rescale_betas_zero_snr=c.rescale_zero_snr,
        )

    # ------------------------------------------------------------------ training
    def compute_loss(self, latents: Tensor, conds: Tensor) -> Tensor:
        """Diffusion loss on a batch of raw (latent, condition) pairs (global torch RNG)."""
        x0 = self.normalize_latent(latents)
        cond = self.normalize_cond(conds)
        batch = x0.shape[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.num_train_timesteps, (batch,), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        drop = torch.rand(batch, device=x0.device) < self.config.cond_dropout
        pred = self.net(x_t, t, cond, drop)
        if self.config.prediction == "x0":
            target = x0
        elif self.config.prediction == "eps":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        per_row = (pred - target).pow(2).mean(dim=1)
        if self.loss_weighting == "min_snr":
            per_row = per_row * self._min_snr_weight(t)
        return per_row.mean()

    def _min_snr_weight(self, t: Tensor, gamma: float = 5.0) -> Tensor:
        ac = self.noise_scheduler.alphas_cumprod.to(t.device)[t]
        snr = ac / (1 - ac)
        clipped = snr.clamp(max=gamma)
        if self.config.prediction == "x0":
            return clipped
        if self.config.prediction == "eps":
            return clipped / snr
        return clipped / (snr + 1)

    def training_step(self, batch, batch_idx):
        latents, conds = batch
        loss = self.compute_loss(latents, conds)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        latents, conds = batch
        loss = self.compute_loss(latents, conds)
        self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step towards the trained weights (no-op when EMA is disabled)."""
        if self.ema is None:
            return
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        self.ema_updates += 1

    def configure_optimizers(self):
        from ..training import cosine_warmup_lr

        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (decay if p.ndim >= 2 and name != "null_cond" else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 1000
        warmup = min(self.warmup_steps, max(0, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_warmup_lr(step, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    @property
    def sampling_net(self) -> Denoiser:
        """The weights used for sampling: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.net

    def guided_prediction(self, x_t: Tensor, t: Tensor, cond: Tensor | None, guidance: float) -> Tensor:
        """Classifier-free-guided model output for standardized ``cond`` (or unconditional if None).

        ``uncond + guidance * (cond - uncond)``, both branches in one batch of 2B. With
        ``guidance == 1`` this is the conditional prediction, computed without the null branch.
        """
        net = self.sampling_net
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if cond is None:
            return net(x_t, t, None)
        if guidance == 1.0:
            return net(x_t, t, cond)
        batch = x_t.shape[0]
        drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)])
        out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]), drop.to(x_t.device))
        out_c, out_u = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    def make_scheduler(self, kind: str = DEFAULT_SCHEDULER):
        """A fresh inference scheduler (diffusers) matching the training schedule and target."""
        if kind == "ddim":
            return DDIMScheduler(
                **self._schedule_kwargs(), clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"
            )
        if kind == "dpm":
            return DPMSolverMultistepScheduler(
                **self._schedule_kwargs(),
                algorithm_type="dpmsolver++",
                solver_order=2,
                lower_order_final=True,
                timestep_spacing="trailing",
                final_sigmas_type="zero",
            )
        raise ModelError(f"unknown sampler {kind!r}; choose one of {SCHEDULERS}")

    def _clip_output(self, out: Tensor, x_t: Tensor, t: int) -> Tensor:
        """Clamp the implied x0 to +-clip_sample (standardized units), return the same kind of output."""
        lim = self.config.clip_sample
        if lim is None:
            return out
        a = self.noise_scheduler.alphas_cumprod[int(t)].to(out)
        sa, sb = a.sqrt(), (1 - a).sqrt()
        kind = self.config.prediction
        if kind == "x0":
            return out.clamp(-lim, lim)
        x0 = (x_t - sb * out) / sa if kind == "eps" else sa * x_t - sb * out
        x0 = x0.clamp(-lim, lim)
        eps = (x_t - sa * x0) / sb
        # v = sqrt(a) * eps - sqrt(1 - a) * x0 (diffusers' get_velocity)
        return eps if kind == "eps" else sa * eps - sb * x0

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor | None = None,
        *,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        scheduler: str | None = None,
        n_samples: int = 1,
        mean_of_samples: int = 1,
    ) -> Tensor:
        """Sample LoRA latents (raw, de-standardized), float32 of shape (B * n_samples, latent_dim).

        ``cond``: (B, cond_dim) face embeddings (raw, as in training) or ``None`` for
        unconditional samples (new identities; then B = 1 and ``n_samples`` is how many).
        Rows ``i*n_samples ... (i+1)*n_samples-1`` belong to condition ``i``.
        ``guidance``: classifier-free guidance scale (1 = plain conditional model).
        ``mean_of_samples``: average this many independent samples per output row (a
        lower-variance estimate of the conditional mean; 1 = an ordinary sample).
        ``num_steps``/``guidance``/``scheduler`` (``"ddim"`` or ``"dpm"``) default to
        ``self.sampling_defaults`` (the values recorded in ``hypernet.json`` for a loaded model).
        Randomness comes only from ``generator`` if given, else from ``torch.Generator`` seeded
        with ``seed`` (``None``: a random seed); same seed and inputs -> bit-identical output.
        """
        defaults = self.sampling_defaults
        num_steps = int(defaults.get("num_steps", DEFAULT_STEPS) if num_steps is None else num_steps)
        guidance = float(defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance)
        scheduler = str(defaults.get("scheduler", DEFAULT_SCHEDULER) if scheduler is None else scheduler)
        if num_steps < 1 or n_samples < 1 or mean_of_samples < 1:
            raise ModelError("num_steps, n_samples and mean_of_samples must all be >= 1")
        was_training = self.training
        self.eval()
        try:
            device = self.latent_mean.device
            if cond is not None:
                cond = torch.as_tensor(cond, dtype=torch.float32, device=device)
                if cond.ndim == 1:
                    cond = cond.unsqueeze(0)
                if cond.ndim != 2 or cond.shape[1] != self.config.cond_dim:
                    raise ModelError(
                        f"condition must be (B, {self.config.cond_dim}); got {tuple(cond.shape)} "
                        "(was the hypernet trained with a different face embedder?)"
                    )
                n_cond = cond.shape[0]
            else:
                n_cond = 1
            reps = n_samples * mean_of_samples
            rows = n_cond * reps
            c = None if cond is None else self.normalize_cond(cond).repeat_interleave(reps, dim=0)
            if generator is None:
                generator = torch.Generator(device="cpu")
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(int(seed))
            sched = self.make_scheduler(scheduler)
            sched.set_timesteps(num_steps, device=device)
            x = torch.randn(rows, self.config.latent_dim, generator=generator).to(device)
            x = x * sched.init_noise_sigma
            for t in sched.timesteps:
                out = self.guided_prediction(x, t.to(device), c, guidance)
                out = self._clip_output(out, x, int(t))
                step_kwargs = {"eta": 0.0} if scheduler == "ddim" else {}
                x = sched.step(out, t, x, return_dict=False, **step_kwargs)[0]
            x = x.view(n_cond * n_samples, mean_of_samples, -1).mean(dim=1)
            return self.denormalize_latent(x).float()
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ export / load
    def export(self, out_dir: str | Path, sampling: dict | None = None) -> Path:
        """Write ``hypernet.safetensors`` (sampling weights + statistics) and ``hypernet.json``.

        The json records ``self.sampling_defaults`` (``num_steps``, ``guidance``, ``scheduler``),
        updated by ``sampling`` if given. Returns the directory.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.sampling_net.state_dict().items()}
        for key in _STAT_KEYS:
            tensors[key] = getattr(self, key).detach().cpu().contiguous()
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "sampling": {**self.sampling_defaults, **(sampling or {})},
        }
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, model_dir: str | Path, map_location: str | torch.device = "cpu") -> "HypernetDiffusion":
        """Load an exported hypernet (safetensors + json only; nothing is unpickled), in eval mode."""
        d = Path(model_dir)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise ModelError(f"no hypernetwork in {d}: need {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"unreadable {cfg_path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ModelError(f"{cfg_path} is not a lorasynth hypernetwork config")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ModelError(f"{cfg_path} has format version {meta.get('version')}; upgrade lorasynth")
        config = HypernetConfig.from_dict(meta.get("config", {}))
        try:
            tensors = load_file(str(w_path), device=str(map_location))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"unreadable {w_path}: {exc}") from exc
        module = cls(config, ema_decay=0.0)
        net_state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        try:
            module.net.load_state_dict(net_state, strict=True)
            for key in _STAT_KEYS:
                getattr(module, key).copy_(tensors[key])
        except (RuntimeError, KeyError) as exc:
            raise ModelError(f"{w_path} does not match its config: {exc}") from exc
        module.sampling_defaults = dict(meta.get("sampling", {}))
        return module.to(map_location).eval()
