"""The hypernetwork, for sampling: plain torch, loaded from safetensors + JSON.

A LoRA latent (PCA coefficients or LoRA-VAE mean, standardized per dimension) is modelled as

    z = mean(face) + r,    r = resid_to_x0^-1 @ x0,    x0 ~ a diffusion conditioned on the face

* ``mean`` is a closed-form kernel ridge regression on the embedding, optionally mixed with a
  neighbour (Nadaraya-Watson, cosine kernel) mean (:mod:`lorasynth.models.hypernet.regression`); widths,
  ridge, k, temperature and mix are chosen on validation people at training time;
* the diffusion (:class:`Denoiser`, an MLP-ResNet conditioned by AdaLN, trained with
  condition dropout for classifier-free guidance) learns the *distribution of the residual given
  the face*, from residuals cross-fitted by person (the size residuals of new people have),
  each training face paired with the residuals of its nearest training faces (one LoRA per face
  is one point; its neighbours' residuals are the sample of its conditional);
* the residual's face-dependent covariance (:class:`~.regression.LocalCovariance`) gives the
  expected delta W of a face in closed form (:meth:`Hypernet.expected_latents`, ``synthesize
  --average``): delta W is a product of factors, so its mean is not the delta W of the mean
  latent, it adds a second-order term of the spread;
* a residual temperature (``spread_scale``) is calibrated on validation people: one face's
  samples are made as alike as the LoRAs of two people with the same face embedding are
  (:func:`~.regression.look_alike_spread`).

:class:`Hypernet` holds the denoiser (EMA weights), the statistics and the mean, and samples
with a DDIM sampler (``eta`` 0 = deterministic ODE, 1 = DDPM-like) written here in a few lines
of torch: loading and sampling import neither Lightning nor diffusers. Training lives in
:mod:`lorasynth.training.hypernet`. Files from older versions (an unconditional residual model
with per-dimension scales, ``resid_std``) still load and sample as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from lorasynth.errors import ModelError
from lorasynth.models.hypernet.schema import (BETA_SCHEDULES, HYPERNET_BOUNDS, MAX_GUIDANCE,  # noqa: F401 - re-exported
                                              MAX_STEPS, PREDICTION_TYPES, HypernetConfig, SamplingDefaults,
                                              check_shapes, expected_shapes, parse_config_file)
from lorasynth.core.safe_io import safetensors_from_bytes


WEIGHTS_FILE = "hypernet.safetensors"
CONFIG_FILE = "hypernet.json"
FORMAT_NAME = "lorasynth-hypernet"
FORMAT_VERSION = 2
SCHEDULERS = ("ddim", "dpm")  # "dpm" (version-1 files) is read as ddim

#: Sampling defaults when a hypernet.json records none (training calibrates and records them).
#: Few DDIM steps shrink the samples: with the exact denoiser of N(0, I) data the sample variance
#: is 0.78 / 0.91 / 0.95 / 0.99 after 10 / 25 / 50 / 200 steps (eta 0; eta 1 is lower still), so
#: the default is 100 steps (the denoiser is a small MLP: still milliseconds).
DEFAULT_STEPS = 100
DEFAULT_GUIDANCE = 1.0
DEFAULT_ETA = 0.0
DEFAULT_SCHEDULER = "ddim"

_COV_KEYS = ("cov_cond", "cov_resid", "cov_k", "cov_tau", "cov_shrink", "resid_cov", "resid_to_x0")
_STAT_KEYS = ("latent_mean", "latent_std", "cond_mean", "cond_scale", "resid_std", "spread_scale", "landmarks", "coef",
              "gamma", "nb_cond", "nb_z", "nb_k", "nb_tau", "mix") + _COV_KEYS
#: Keys a file may lack (written before they existed): the defaults keep the old behaviour.
_OPTIONAL_KEYS = ("spread_scale", "nb_cond", "nb_z", "nb_k", "nb_tau", "mix") + _COV_KEYS
_RESIZABLE_KEYS = ("landmarks", "coef", "nb_cond", "nb_z", "cov_cond", "cov_resid")


def alphas_cumprod(config: HypernetConfig) -> Tensor:
    """``prod(1 - beta)`` of the training noise schedule (float64), as diffusers computes it."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(1e-4**0.5, 0.02**0.5, n, dtype=torch.float64) ** 2  # diffusers defaults
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal 2021)
        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    if config.rescale_zero_snr:  # Lin et al. 2023, Algorithm 1
        ab_sqrt = torch.cumprod(1 - betas, 0).sqrt()
        first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
        ab_sqrt = (ab_sqrt - last) * first / (first - last)
        ab = ab_sqrt**2
        alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
        betas = 1 - alphas
    return torch.cumprod(1 - betas, 0)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim).

    Same formula as diffusers' ``get_timestep_embedding(flip_sin_to_cos=True, shift=0)``; kept
    local so loading a hypernetwork for sampling does not import diffusers.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class AdaLNBlock(nn.Module):
    """Pre-norm residual MLP whose norm is modulated by the conditioning vector (adaLN-Zero)."""

    def __init__(self, width: int, emb_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.modulation = nn.Linear(emb_dim, 3 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(emb).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.mlp(h)


class Denoiser(nn.Module):
    """Predicts x0, v or eps (per config) from a noisy standardized latent, a timestep and a condition.

    ``forward(x_t, t, cond, drop)``: ``x_t`` (B, latent_dim), ``t`` (B,) timesteps in
    ``[0, num_train_timesteps)``, ``cond`` (B, cond_dim) standardized face embeddings or ``None``
    (all unconditional), ``drop`` an optional (B,) bool mask selecting rows that use the null
    embedding instead of their condition.
    """

    def __init__(self, config: HypernetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        hidden = max(1, int(round(c.width * c.mlp_ratio)))
        self.time_mlp = nn.Sequential(nn.Linear(c.emb_dim, c.emb_dim), nn.SiLU(), nn.Linear(c.emb_dim, c.emb_dim))
        self.cond_mlp = nn.Sequential(nn.Linear(c.cond_dim, c.emb_dim), nn.SiLU(), nn.Linear(c.emb_dim, c.emb_dim))
        # The unconditional branch's "condition": learned, in the same space as cond_mlp's output.
        self.null_cond = nn.Parameter(torch.randn(c.emb_dim) * 0.02)
        self.in_proj = nn.Linear(c.latent_dim, c.width)
        self.blocks = nn.ModuleList(AdaLNBlock(c.width, c.emb_dim, hidden, c.dropout) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(c.emb_dim, 2 * c.width)
        self.out_proj = nn.Linear(c.width, c.latent_dim)
        for layer in (self.out_modulation, self.out_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_condition(self, cond: Tensor | None, batch: int, drop: Tensor | None = None) -> Tensor:
        """Condition embedding (B, emb_dim); the null embedding where ``cond`` is None or ``drop``."""
        null = self.null_cond.unsqueeze(0).expand(batch, -1)
        if cond is None:
            return null
        c_emb = self.cond_mlp(cond)
        if drop is None:
            return c_emb
        return torch.where(drop.unsqueeze(-1), null, c_emb)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, drop: Tensor | None = None,
                cond_emb: Tensor | None = None) -> Tensor:
        """``cond_emb``: :meth:`embed_condition` of ``(cond, drop)`` computed once by the caller (the
        sampler reuses it for every step); ``cond`` and ``drop`` are then not read."""
        batch = x_t.shape[0]
        if t.ndim == 0:
            t = t.expand(batch)
        t_emb = self.time_mlp(timestep_embedding(t, self.config.emb_dim))
        c_emb = self.embed_condition(cond, batch, drop) if cond_emb is None else cond_emb
        emb = nn.functional.silu(t_emb + c_emb)
        h = self.in_proj(x_t)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.out_modulation(emb).chunk(2, dim=-1)
        return self.out_proj(self.out_norm(h) * (1 + scale) + shift)


class Hypernet(nn.Module):
    """The exported hypernetwork: denoiser + statistics + closed-form mean + DDIM sampler."""

    def __init__(self, config: HypernetConfig) -> None:
        super().__init__()
        self.config = config
        self.net = Denoiser(config)
        k, c = config.latent_dim, config.cond_dim
        self.register_buffer("latent_mean", torch.zeros(k))
        self.register_buffer("latent_std", torch.ones(k))
        self.register_buffer("cond_mean", torch.zeros(c))
        self.register_buffer("cond_scale", torch.ones(()))
        self.register_buffer("resid_std", torch.ones(k))
        # factor on sampled residuals (the temperature, the same for every dimension), calibrated on
        # validation people so that one face's samples are as alike as look-alike people's LoRAs
        self.register_buffer("spread_scale", torch.ones(k))
        self.register_buffer("landmarks", torch.zeros(0, c))
        self.register_buffer("coef", torch.zeros(0, k))
        self.register_buffer("gamma", torch.zeros(()))
        # neighbour (Nadaraya-Watson) mean on cosine similarity of raw embeddings, mixed with the
        # kernel ridge mean as ``mix * ridge + (1 - mix) * neighbours`` (mix chosen on validation)
        self.register_buffer("nb_cond", torch.zeros(0, c))
        self.register_buffer("nb_z", torch.zeros(0, k))
        self.register_buffer("nb_k", torch.zeros((), dtype=torch.long))
        self.register_buffer("nb_tau", torch.ones(()))
        self.register_buffer("mix", torch.ones(()))
        # the diffusion models ``x0 = resid_to_x0 @ r`` (residuals in raw latent units over one
        # global scale); the local residual covariance (regression.LocalCovariance, with its
        # global ``resid_cov``) gives the expected delta W in closed form.
        # Empty ``cov_resid``: the older per-dimension model ``r = resid_std * x0``.
        self.register_buffer("cov_cond", torch.zeros(0, c))
        self.register_buffer("cov_resid", torch.zeros(0, k))
        self.register_buffer("cov_k", torch.zeros((), dtype=torch.long))
        self.register_buffer("cov_tau", torch.ones(()))
        self.register_buffer("cov_shrink", torch.ones(()))
        self.register_buffer("resid_cov", torch.eye(k))
        self.register_buffer("resid_to_x0", torch.eye(k))
        self.register_buffer("alphas_cumprod", alphas_cumprod(config).float(), persistent=False)
        #: Sampling settings recorded in hypernet.json (``num_steps``, ``guidance``, ``eta``).
        self.sampling_defaults: dict = {"num_steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
                                        "eta": DEFAULT_ETA, "scheduler": DEFAULT_SCHEDULER}

    # ------------------------------------------------------------------ spaces
    def normalize_latent(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize_latent(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    def normalize_cond(self, c: Tensor) -> Tensor:
        return (c - self.cond_mean) / self.cond_scale

    def conditional_mean(self, cond_n: Tensor | None, batch: int = 1) -> Tensor:
        """The closed-form mean (standardized latent units) of normalized conditions (zeros without one)."""
        if cond_n is None or (len(self.landmarks) == 0 and len(self.nb_cond) == 0):
            n = batch if cond_n is None else len(cond_n)
            return torch.zeros(n, self.config.latent_dim, device=self.latent_mean.device)
        mix = float(self.mix) if len(self.nb_cond) else 1.0
        out = 0.0
        if mix > 0 and len(self.landmarks):
            d2 = torch.cdist(cond_n, self.landmarks).pow(2)
            out = mix * (torch.exp(-self.gamma * d2) @ self.coef)
        if mix < 1:
            from lorasynth.models.hypernet.regression import NeighbourMean

            nb = NeighbourMean(self.nb_cond, self.nb_z, int(self.nb_k), float(self.nb_tau))
            out = out + (1 - mix) * nb(cond_n * self.cond_scale + self.cond_mean)
        return out

    @property
    def local_covariance(self) -> bool:
        """True when the model holds the face-dependent residual covariance (and ``resid_to_x0``)."""
        return len(self.cov_resid) > 0

    def residual_covariance(self, cond_n: Tensor | None, batch: int = 1) -> Tensor:
        """Covariance ``S(c)`` (B, K, K) of the residual around the mean, per normalized condition.

        :class:`~lorasynth.models.hypernet.regression.LocalCovariance` when the model has one (else, and
        without a condition, the global covariance of the residuals).
        """
        if cond_n is None or not self.local_covariance:
            n = batch if cond_n is None else len(cond_n)
            glob = self.resid_cov if self.local_covariance else torch.diag(self.resid_std.pow(2))
            return glob.expand(n, -1, -1)
        from lorasynth.models.hypernet.regression import LocalCovariance

        cov = LocalCovariance(self.cov_cond, self.cov_resid, int(self.cov_k), float(self.cov_tau),
                              float(self.cov_shrink), self.resid_cov)
        return cov(cond_n * self.cond_scale + self.cond_mean)

    def cached(self, name: str, inputs: tuple[Tensor, ...], make):
        """``make()``, computed once per model: recomputed only when one of ``inputs`` is replaced
        or changed in place (keyed on each tensor's storage and version counter)."""
        # inference tensors (a model loaded under torch.inference_mode, as ComfyUI does) have no version counter
        key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.device, tuple(t.shape)) for t in inputs)
        cache = self.__dict__.setdefault("_sampling_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                hit = cache[name] = (key, make())
        return hit[1]

    def _x0_to_resid(self) -> Tensor:
        """The inverse of ``resid_to_x0`` (cached per model)."""
        return self.cached("x0_to_resid", (self.resid_to_x0,),
                           lambda: torch.linalg.inv(self.resid_to_x0.double()).float())

    def to_x0(self, z: Tensor, cond: Tensor | None) -> Tensor:
        """Raw latents and raw conditions -> the diffusion's data space (scaled residuals)."""
        c = None if cond is None else self.normalize_cond(cond)
        return self.residual_to_x0(self.normalize_latent(z) - self.conditional_mean(c, len(z)))

    def residual_to_x0(self, r: Tensor) -> Tensor:
        """Residuals (standardized latent units) -> the diffusion's data space."""
        return r @ self.resid_to_x0.T if self.local_covariance else r / self.resid_std

    def from_x0(self, x0: Tensor, cond_n: Tensor | None) -> Tensor:
        mean = self.conditional_mean(cond_n, len(x0))
        if self.local_covariance:
            return self.denormalize_latent(mean + x0 @ self._x0_to_resid().T)
        return self.denormalize_latent(mean + self.resid_std * x0)

    def expected_latents(self, cond: Tensor, keep: float = 0.9999) -> Tensor:
        """``2m`` latents per condition whose mean delta W is the model's expected delta W.

        With an affine decoder (PCA) delta W is a quadratic function of the latent, so its
        expectation depends only on the mean and the covariance of the residual; these "sigma
        points" ``mean +- sqrt(m) * L[:, l]`` (``L L^T`` = the face's residual covariance
        :meth:`residual_covariance`, times the squared temperature) have exactly that mean and
        covariance, so the average of their delta W is the expected delta W in closed form: the
        limit of the average of N samples of that distribution as N grows (the residual
        diffusion is trained on the same neighbour residuals). ``L`` keeps the ``m <= K``
        principal directions that hold a fraction ``keep`` of the variance (raw latent units; the
        same ``m`` for every condition of a call), so the result is exact up to the dropped
        ``1 - keep``. Raw latents, rows ``i*2m .. (i+1)*2m-1`` belong to condition ``i``.
        """
        cond = torch.atleast_2d(torch.as_tensor(cond, dtype=torch.float32))
        cn = self.normalize_cond(cond)
        k = self.config.latent_dim
        mean = self.denormalize_latent(self.conditional_mean(cn)).double()
        temp = float(self.spread_scale.mean())  # the temperature scales every residual alike
        std = self.latent_std.double()
        cov = self.residual_covariance(cn).double() * (std[:, None] * std[None, :]) * temp**2  # raw latent units
        val, vec = torch.linalg.eigh(cov)  # ascending
        val = val.clamp_min(0).flip(-1)
        vec = vec.flip(-1)
        kept = (val.cumsum(-1) / val.sum(-1, keepdim=True).clamp_min(1e-300) < keep).sum(-1) + 1
        m = int(kept.max().clamp(max=k))  # the same count for every condition of the batch
        root = vec[..., :m] * (val[:, :m] * m).sqrt().unsqueeze(1)  # (B, K, m): columns sqrt(m * lambda) v
        pts = torch.cat([mean[:, None] + root.transpose(1, 2), mean[:, None] - root.transpose(1, 2)], dim=1)
        return pts.reshape(-1, k).float()

    # ------------------------------------------------------------------ sampling
    def guided_prediction(self, x_t: Tensor, t: Tensor, cond: Tensor | None, guidance: float,
                          cond_emb: Tensor | None = None) -> Tensor:
        """``uncond + guidance * (cond - uncond)`` in one batch of 2B (just the conditional at 1).

        ``cond_emb``: :meth:`guidance_embedding` of ``(cond, guidance)``, when the caller has it."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if cond is None:
            return self.net(x_t, t, None)
        if guidance == 1.0:
            return self.net(x_t, t, cond, cond_emb=cond_emb)
        batch = x_t.shape[0]
        drop = None if cond_emb is not None else self._cfg_drop(batch, x_t.device)
        out_c, out_u = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]), drop,
                                cond_emb=cond_emb).chunk(2)
        return out_u + guidance * (out_c - out_u)

    @staticmethod
    def _cfg_drop(batch: int, device) -> Tensor:
        return torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(device)

    def guidance_embedding(self, cond: Tensor | None, guidance: float) -> Tensor | None:
        """The condition embedding :meth:`guided_prediction` feeds the denoiser (the same at every
        step of one sampling call: computed once per call)."""
        if cond is None:
            return None
        if guidance == 1.0:
            return self.net.embed_condition(cond, len(cond))
        return self.net.embed_condition(torch.cat([cond, cond]), 2 * len(cond), self._cfg_drop(len(cond), cond.device))

    def split_prediction(self, out: Tensor, x_t: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Model output at ``alpha_bar = a`` -> ``(x0_hat, eps_hat)``."""
        sa, sb = a.sqrt(), (1 - a).sqrt()
        kind = self.config.prediction
        if kind == "eps":
            x0, eps = (x_t - sb * out) / sa, out
        elif kind == "v":
            x0, eps = sa * x_t - sb * out, sb * x_t + sa * out
        else:
            x0 = out
            eps = (x_t - sa * x0) / sb.clamp_min(1e-8)
        lim = self.config.clip_sample
        if lim is not None:
            x0 = x0.clamp(-lim, lim)
            eps = (x_t - sa * x0) / sb.clamp_min(1e-8)
        return x0, eps

    def timesteps(self, num_steps: int) -> list[int]:
        """``num_steps`` timesteps with "trailing" spacing (the last one is ``T - 1``)."""
        n = self.config.num_train_timesteps
        steps = min(num_steps, n)
        return [int(round(n - i * n / steps)) - 1 for i in range(steps)]

    @torch.no_grad()
    def ddim(self, rows: int, c: Tensor | None, num_steps: int, guidance: float, eta: float,
             generator: torch.Generator) -> Tensor:
        """``rows`` draws of the diffusion's data (x0 space), conditions ``c`` normalized (or None)."""
        device = self.latent_mean.device
        x = torch.randn(rows, self.config.latent_dim, generator=generator).to(device)
        ts = self.timesteps(num_steps)
        ac = self.alphas_cumprod.to(device)
        cond_emb = self.guidance_embedding(c, guidance)
        for i, t in enumerate(ts):
            a = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
            out = self.guided_prediction(x, torch.tensor(t, device=device), c, guidance, cond_emb)
            x0, eps = self.split_prediction(out, x, a)
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if i + 1 < len(ts) and eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(device)
        return x

    @torch.no_grad()
    def sample(self, cond: Tensor | None = None, *, num_steps: int | None = None, guidance: float | None = None,
               eta: float | None = None, seed: int | None = 0, generator: torch.Generator | None = None,
               scheduler: str | None = None, n_samples: int = 1,
               center: bool = False) -> Tensor:
        """Sample LoRA latents (raw, de-standardized), float32 of shape (B * n_samples, latent_dim).

        ``cond``: (B, cond_dim) face embeddings (raw, as in training) or ``None`` for
        unconditional samples (new identities; then B = 1 and ``n_samples`` is how many: each
        draws the mean of a random library person's embedding, then a residual).
        Rows ``i*n_samples ... (i+1)*n_samples-1`` belong to condition ``i``.
        ``guidance``: classifier-free guidance of the residual model (1 = plain conditional).
        ``eta``: DDIM noise (0 = deterministic ODE sampler, 1 = DDPM-like).
        ``center``: shift the residuals of each condition's samples to mean zero, so their latent
        average is exactly the closed-form conditional mean (for the average-of-N mode: the average
        delta W then departs from the mean's only by the second-order effect of the spread, without
        the sampling noise of N finite draws).
        Defaults come from ``self.sampling_defaults``; same seed and inputs -> same output.
        """
        d = self.sampling_defaults
        num_steps = int(d.get("num_steps", DEFAULT_STEPS) if num_steps is None else num_steps)
        guidance = float(d.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance)
        eta = float(d.get("eta", DEFAULT_ETA) if eta is None else eta)
        scheduler = str(d.get("scheduler", DEFAULT_SCHEDULER) if scheduler is None else scheduler)
        if scheduler not in SCHEDULERS:
            raise ModelError(f"unknown sampler {scheduler!r}; choose one of {SCHEDULERS}")
        if num_steps < 1 or n_samples < 1:
            raise ModelError("num_steps and n_samples must both be >= 1")
        was_training = self.training
        self.eval()
        try:
            device = self.latent_mean.device
            if generator is None:
                generator = torch.Generator(device="cpu")
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(int(seed))
            reps = n_samples
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
                c = self.normalize_cond(cond).repeat_interleave(reps, dim=0)
            else:
                n_cond = 1
                c = None
            rows = n_cond * reps
            mean_cond = c
            if c is None and len(self.landmarks):  # a new identity: a random library person's mean
                pick = torch.randint(len(self.landmarks), (rows,), generator=generator)
                mean_cond = self.landmarks[pick.to(device)]
            if not self.config.residual_condition and self.config.residual_mean:
                c = None  # the residual model is unconditional (see HypernetConfig.residual_condition)
            x = self.ddim(rows, c, num_steps, guidance, eta, generator)
            if center and reps > 1:
                x = x.view(n_cond, reps, -1)
                x = (x - x.mean(dim=1, keepdim=True)).reshape(rows, -1)
            return self.from_x0(x * self.spread_scale, mean_cond).float()
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ files
    def export(self, out_dir: str | Path, sampling: dict | None = None, extra: dict | None = None) -> Path:
        """Write ``hypernet.safetensors`` (weights + statistics + mean) and ``hypernet.json``."""
        from lorasynth.core.safe_io import write_safetensors, write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        for key in _STAT_KEYS:
            tensors[key] = getattr(self, key).detach().cpu().contiguous()
        write_safetensors(tensors, out / WEIGHTS_FILE, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config.to_dict(),
                "sampling": {**self.sampling_defaults, **(sampling or {})}, **(extra or {})}
        write_text(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, model_dir: str | Path, map_location: str | torch.device = "cpu", read=None) -> "Hypernet":
        """Load an exported hypernet (safetensors + json only; nothing is unpickled), in eval mode.

        ``read(name) -> bytes``: where the files come from (default: the folder, regular files only;
        a model folder passes a reader of hash-checked bytes). Every config field is type- and
        range-checked, and the weights' shapes are compared with the config before anything is
        allocated: a crafted file is one ModelError line.
        """
        import os

        d = Path(model_dir)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if read is None:
            if not os.path.lexists(cfg_path) or not os.path.lexists(w_path):
                raise ModelError(f"no hypernetwork in {d}: need {CONFIG_FILE} and {WEIGHTS_FILE}")
            from lorasynth.models.latent.export import file_reader

            read = file_reader(d)
        version, raw_cfg, raw_sampling = parse_config_file(read(CONFIG_FILE), cfg_path, FORMAT_NAME, FORMAT_VERSION)
        config = HypernetConfig.from_dict(raw_cfg)
        defaults = {"num_steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "eta": DEFAULT_ETA,
                    "scheduler": DEFAULT_SCHEDULER}
        sampling = asdict(SamplingDefaults.from_dict(raw_sampling, str(cfg_path), config.num_train_timesteps, defaults,
                                                     SCHEDULERS))
        tensors, _ = safetensors_from_bytes(read(WEIGHTS_FILE), w_path, error=ModelError)
        check_shapes(tensors, config, w_path)  # before allocating: the config's sizes are the file's
        if str(map_location) != "cpu":
            tensors = {k: v.to(map_location) for k, v in tensors.items()}
        module = cls(config)
        net_state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        try:
            module.net.load_state_dict(net_state, strict=True)
            for key in _STAT_KEYS:
                if key in tensors:
                    buf = getattr(module, key)
                    if key in _RESIZABLE_KEYS:
                        setattr(module, key, tensors[key].float().clone())
                    else:
                        buf.copy_(tensors[key])
                elif version >= 2 and key not in _OPTIONAL_KEYS:
                    raise KeyError(key)
            # the covariance tensors come as a set: a file with the neighbour residuals but without
            # e.g. ``resid_to_x0`` would sample on the wrong scale, silently
            if len(tensors.get("cov_resid", ())) and (missing := [k for k in _COV_KEYS if k not in tensors]):
                raise KeyError(f"local residual covariance without {', '.join(missing)}")
        except (RuntimeError, KeyError) as exc:
            raise ModelError(f"{w_path} does not match its config: {exc}") from exc
        if module.landmarks.ndim != 2 or module.landmarks.shape[1] != config.cond_dim or \
                module.coef.shape != (len(module.landmarks), config.latent_dim) or \
                module.nb_cond.shape[1:] != (config.cond_dim,) or module.nb_z.shape != (len(module.nb_cond), config.latent_dim) or \
                module.cov_cond.shape[1:] != (config.cond_dim,) or \
                module.cov_resid.shape != (len(module.cov_cond), config.latent_dim):
            raise ModelError(f"{w_path}: mean tensors do not match the config")
        module.sampling_defaults = sampling
        return module.to(map_location).eval()
