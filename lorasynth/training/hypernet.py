"""Training the hypernetwork (Lightning): closed-form mean, residual diffusion, EMA, calibration.

:class:`HypernetDiffusion` is the LightningModule that trains a
:class:`~lorasynth.models.hypernet.model.Hypernet` (the plain-torch model that synthesis loads):

* :meth:`HypernetDiffusion.for_data` measures the standardization statistics on the training
  pairs, fits the kernel-ridge conditional mean (tuned on the validation pairs, see
  :mod:`lorasynth.models.hypernet.regression`), the local residual covariance, and keeps the
  *cross-fitted* residuals as the diffusion's data, each training face paired with the
  residuals of its ``k`` nearest training faces (:class:`NeighbourPairs`, ``k`` chosen on
  validation people);
* training is denoising on those pairs: random timesteps of the cosine schedule, the
  ``v`` (or ``eps``/``x0``) target, condition dropout for classifier-free guidance, AdamW with
  warm-up + cosine decay, and an EMA of the weights that sampling and export use;
* :func:`calibrate_sampling` picks the sampler settings (steps, DDIM eta, guidance) on
  validation people by the energy score, a proper scoring rule for samples: it rewards being
  close to the truth *and* having the right spread (a collapsed sampler scores badly); and the
  residual temperature that makes one face's samples as alike as the LoRAs of look-alike people.

Lightning is imported here only; the exported model loads without it.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lorasynth.errors import ModelError
from lorasynth.models.hypernet.model import (  # noqa: F401  (re-exported: older code imports them from here)
    CONFIG_FILE,
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    FORMAT_NAME,
    FORMAT_VERSION,
    SCHEDULERS,
    WEIGHTS_FILE,
    Denoiser,
    Hypernet,
    HypernetConfig,
)
from lorasynth.core.delta import energy_scores
from lorasynth.models.hypernet.regression import (MIX_GRID, choose_pair_neighbours, cross_fit_neighbours, fit_kernel_mean,
                                                  fit_local_covariance, fit_neighbour_mean, make_folds, top_neighbours,
                                                  weighted_mse)


class NeighbourPairs(Dataset):
    """Training pairs ``(x0 of row j, condition of row i)`` for every row ``i`` and each ``j`` of its
    ``k`` nearest training rows (itself included): the kernel-smoothed sample of the conditional
    residual distribution that a face's one or two LoRAs cannot give alone."""

    def __init__(self, x0: Tensor, conds: Tensor, neighbours: Tensor) -> None:
        self.x0, self.conds, self.neighbours = x0, conds, neighbours
        self.k = neighbours.shape[1]

    def __len__(self) -> int:
        return len(self.conds) * self.k

    def __getitem__(self, idx: int):
        i, slot = divmod(int(idx), self.k)
        return self.x0[self.neighbours[i, slot]], self.conds[i]


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


def latent_dataloader(x0: Tensor, conds: Tensor, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                      num_samples: int | None = None) -> DataLoader:
    """A DataLoader of (diffusion-space x0, normalized condition) pairs.

    ``num_samples`` chains reshuffled passes into one long epoch (Lightning's per-epoch cost
    dominates on small libraries); ``drop_last`` so every step sees a full batch.
    """
    x0, conds = _as_pairs(x0, conds)
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(x0))
    sampler = None
    if shuffle and num_samples:
        sampler = torch.utils.data.RandomSampler(range(len(x0)), num_samples=max(num_samples, len(x0)), generator=gen)
    return DataLoader(TensorDataset(x0, conds), batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, drop_last=shuffle and len(x0) > batch_size,
                      generator=gen if sampler is None else None)


class HypernetDiffusion(lightning.LightningModule):
    """Trains a :class:`Hypernet` (see module docstring); ``self.model`` holds the weights and
    statistics, ``self.ema`` the EMA copy of its denoiser.

    Batches are ``(x0, cond_n)``: standardized residuals and normalized conditions, as made by
    :meth:`for_data` (``train_pairs`` / ``val_pairs``).
    """

    def __init__(self, config: HypernetConfig, lr: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_steps: int = 100, ema_decay: float = 0.999, loss_weighting: str = "none") -> None:
        super().__init__()
        if loss_weighting not in ("none", "min_snr"):
            raise ModelError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.ema_decay, self.loss_weighting = ema_decay, loss_weighting
        self.model = Hypernet(config)
        self.ema = copy.deepcopy(self.model.net).requires_grad_(False) if ema_decay > 0 else None
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.train_pairs: tuple[Tensor, Tensor] | None = None
        self.val_pairs: tuple[Tensor, Tensor] | None = None
        self.mean_report: dict = {}
        self.cov_report: dict | None = None
        self.pair_neighbours: Tensor | None = None  # (n, k) training rows whose residuals pair with row i
        self.pair_report: dict | None = None

    @property
    def config(self) -> HypernetConfig:
        return self.model.config

    @property
    def net(self) -> Denoiser:
        return self.model.net

    # ------------------------------------------------------------------ data
    @classmethod
    def for_data(cls, latents: Tensor, conds: Tensor, config: HypernetConfig | None = None,
                 val: tuple[Tensor, Tensor] | None = None, seed: int = 0, groups: Tensor | None = None,
                 energy=None, **kwargs: Any) -> "HypernetDiffusion":
        """A module sized for ``latents`` (N, K) / ``conds`` (N, C), statistics and mean fitted.

        ``val``: validation (latents, conds) of people not in training: they choose the mean's
        kernel width and ridge, the neighbour mean's k and temperature and the mix of the two
        (else 5-fold cross-validation of the ridge alone). ``groups``: a person id per training
        row (cross-fitting folds keep a person's LoRAs together). ``energy(samples (n, S, K),
        truth (n, K)) -> (n,)``: the score (raw latents, lower is better) that chooses the
        residual model's neighbours (default: Euclidean energy score in raw latent units).
        """
        latents, conds = _as_pairs(latents, conds)
        base = (config or HypernetConfig()).to_dict()
        base.update(latent_dim=latents.shape[1], cond_dim=conds.shape[1])
        module = cls(HypernetConfig.from_dict(base), **kwargs)
        module.set_data(latents, conds, val, seed, groups, energy)
        return module

    @torch.no_grad()
    def set_data(self, latents: Tensor, conds: Tensor, val: tuple[Tensor, Tensor] | None = None, seed: int = 0,
                 groups: Tensor | None = None, energy=None) -> None:
        """Statistics, closed-form mean and the (cross-fitted) diffusion training pairs."""
        latents, conds = _as_pairs(latents, conds)
        m = self.model
        if latents.shape[1] != self.config.latent_dim or conds.shape[1] != self.config.cond_dim:
            raise ModelError(
                f"data is latent {latents.shape[1]}-d / condition {conds.shape[1]}-d but the hypernet "
                f"expects {self.config.latent_dim}-d / {self.config.cond_dim}-d"
            )
        std = latents.std(0)
        floor = max(float(std.median()) * 1e-3, 1e-8)  # a constant dimension would divide by ~0
        m.latent_mean.copy_(latents.mean(0))
        m.latent_std.copy_(std.clamp_min(floor))
        m.cond_mean.copy_(conds.mean(0))
        m.cond_scale.copy_((conds - conds.mean(0)).pow(2).mean().sqrt().clamp_min(1e-8))
        zn, cn = m.normalize_latent(latents), m.normalize_cond(conds)
        vz = vc = None
        if val is not None and len(val[0]):
            vz, vc = m.normalize_latent(torch.as_tensor(val[0]).float()), m.normalize_cond(torch.as_tensor(val[1]).float())
        if self.config.residual_mean:
            m.mix.fill_(1.0)  # a refit starts from the ridge mean alone
            m.nb_cond, m.nb_z = m.nb_cond[:0], m.nb_z[:0]
            weight = m.latent_std.pow(2)  # choose every setting by the error in raw latent units
            mean, resid, self.mean_report = fit_kernel_mean(cn, zn, vc, vz, self.config.mean_landmarks, seed=seed,
                                                            groups=groups, weight=weight)
            m.landmarks, m.coef = mean.landmarks.clone(), mean.coef.clone()
            m.gamma.fill_(mean.gamma)
            if vz is not None:
                resid = self._fit_neighbour_mix(conds, zn, resid, torch.as_tensor(val[1]).float(), vz, vc, weight,
                                                make_folds(len(zn), 5, groups, seed))
        else:
            resid = zn
        rstd = resid.std(0)
        m.resid_std.copy_(rstd.clamp_min(max(float(rstd.median()) * 1e-3, 1e-8)))
        m.cov_cond, m.cov_resid = m.cov_cond[:0], m.cov_resid[:0]
        self.cov_report = self.pair_neighbours = self.pair_report = None
        vm = None if vz is None else m.conditional_mean(vc)  # validation people's mean and residuals
        val_raw = None if vz is None else torch.as_tensor(val[1]).float()
        if self.config.residual_mean and self.config.local_covariance and vz is not None and len(resid) > 1:
            self._fit_local_covariance(conds, resid, val_raw, vz - vm)
        if self.config.residual_mean and self.config.residual_condition:
            k = self.config.pair_neighbours
            if not k and vz is not None:
                score = None if energy is None else (
                    lambda xs, t: energy(m.denormalize_latent(xs), m.denormalize_latent(t)))
                k, self.pair_report = choose_pair_neighbours(conds, resid, val_raw, vz - vm, m.latent_std, seed=seed,
                                                             val_mean=vm, energy=score)
            self.pair_neighbours = top_neighbours(conds, conds, int(k or 16))
        self.train_pairs = (m.residual_to_x0(resid), cn)
        if vz is not None:
            self.val_pairs = (m.residual_to_x0(vz - vm), vc)

    @torch.no_grad()
    def _fit_local_covariance(self, cond_raw: Tensor, resid: Tensor, val_raw: Tensor, val_resid: Tensor) -> None:
        """The local residual covariance (chosen on validation people) and the diffusion's scaling."""
        m = self.model
        cov, self.cov_report = fit_local_covariance(cond_raw, resid, val_raw, val_resid)
        # the diffusion's space: raw latent units over one global scale (not whitened: directions
        # keep the weight they have in the LoRA; whitening gave the many low-variance directions
        # as much of the loss as the few that carry the structure, and blurred the samples)
        raw_rms = (resid * m.latent_std).pow(2).mean().sqrt().clamp_min(1e-12)
        m.resid_cov.copy_(cov.global_cov)
        m.resid_to_x0.copy_(torch.diag(m.latent_std / raw_rms))
        m.cov_cond, m.cov_resid = cov.cond.clone(), cov.resid.clone()
        m.cov_k.fill_(cov.k)
        m.cov_tau.fill_(cov.tau)
        m.cov_shrink.fill_(cov.shrink)

    @torch.no_grad()
    def _fit_neighbour_mix(self, cond_raw, zn, kr_resid, val_raw, vz, vc, weight, fold) -> Tensor:
        """Neighbour mean and its mix with the ridge mean, chosen on validation; cross-fitted residuals."""
        m = self.model
        nb, nb_report = fit_neighbour_mean(cond_raw, zn, val_raw, vz, weight)
        kr_val, nb_val = m.conditional_mean(vc), nb(val_raw)
        errs = {a: weighted_mse(a * kr_val + (1 - a) * nb_val, vz, weight) for a in MIX_GRID}
        mix = min(errs, key=errs.get)
        self.mean_report = {**self.mean_report, "neighbours": nb_report,
                            "mix_ridge_weight": mix, "mix_validation_mse": {f"{a:g}": e for a, e in errs.items()}}
        if mix >= 1.0:
            return kr_resid
        m.nb_cond, m.nb_z = nb.cond.clone(), nb.z.clone()
        m.nb_k.fill_(nb.k)
        m.nb_tau.fill_(nb.tau)
        m.mix.fill_(mix)
        nb_cf = cross_fit_neighbours(nb, cond_raw, fold)
        return mix * kr_resid + (1 - mix) * (zn - nb_cf)

    def train_dataloader_for(self, batch_size: int, max_steps: int, seed: int = 0) -> DataLoader:
        if self.train_pairs is None:
            raise ModelError("call for_data/set_data before training the hypernetwork")
        from lorasynth.training.lightning import StepSampler

        x0, conds = _as_pairs(*self.train_pairs)
        data = TensorDataset(x0, conds) if self.pair_neighbours is None else NeighbourPairs(x0, conds, self.pair_neighbours)
        batch_size = min(batch_size, len(data))
        # this rank's slice of every global batch (DDP); one process: a reshuffled long epoch
        return DataLoader(data, batch_size=batch_size, drop_last=True,
                          sampler=StepSampler(len(data), batch_size, max_steps, seed))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resize the data-sized buffers (landmarks, coef, ...) to the checkpoint's before loading."""
        state = checkpoint.get("state_dict", {})
        for key in ("landmarks", "coef", "nb_cond", "nb_z", "cov_cond", "cov_resid"):
            t = state.get(f"model.{key}")
            if t is not None:
                setattr(self.model, key, torch.zeros_like(t))

    # ------------------------------------------------------------------ training
    def compute_loss(self, x0: Tensor, cond: Tensor) -> Tensor:
        """Denoising loss on a batch of (x0, normalized condition) pairs (global torch RNG)."""
        ac = self.model.alphas_cumprod.to(x0.device)
        batch = x0.shape[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.num_train_timesteps, (batch,), device=x0.device)
        a = ac[t].unsqueeze(1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = torch.rand(batch, device=x0.device) < self.config.cond_dropout
        if self.config.residual_mean and not self.config.residual_condition:
            drop = torch.ones_like(drop)  # an unconditional residual model
        pred = self.net(x_t, t, cond, drop)
        if self.config.prediction == "x0":
            target = x0
        elif self.config.prediction == "eps":
            target = noise
        else:
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        per_row = (pred - target).pow(2).mean(dim=1)
        if self.loss_weighting == "min_snr":
            snr = (a / (1 - a)).squeeze(1)
            w = snr.clamp(max=5.0)
            per_row = per_row * (w if self.config.prediction == "x0" else w / snr if self.config.prediction == "eps"
                                 else w / (snr + 1))
        return per_row.mean()

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(*batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.compute_loss(*batch)
        self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step towards the trained weights (decay warms up as ``(1+n)/(10+n)``)."""
        if self.ema is None:
            return
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        self.ema_updates += 1

    def configure_optimizers(self):
        from lorasynth.training.lightning import cosine_warmup_lr

        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (decay if p.ndim >= 2 and name != "null_cond" else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 1000
        warmup = min(self.warmup_steps, max(0, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_warmup_lr(step, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ the exported model
    def hypernet(self) -> Hypernet:
        """A plain :class:`Hypernet` with the EMA weights (a copy), in eval mode."""
        out = copy.deepcopy(self.model).cpu()
        if self.ema is not None:
            out.net.load_state_dict(self.ema.state_dict())
        return out.eval()

    @torch.no_grad()
    def sample(self, cond=None, **kwargs) -> Tensor:
        return self.hypernet().sample(cond, **kwargs)

    def export(self, out_dir, sampling: dict | None = None, extra: dict | None = None):
        """Write the EMA model as ``hypernet.safetensors`` + ``hypernet.json``."""
        return self.hypernet().export(out_dir, sampling, {"mean": self.mean_report, **(extra or {})})


#: Sampler settings tried by :func:`calibrate_sampling`.
CALIBRATION_GRID = ((50, 0.0, 1.0), (100, 0.0, 1.0), (200, 0.0, 1.0), (100, 1.0, 1.0), (100, 0.0, 1.5))


def energy_score(samples: Tensor, truth: Tensor) -> float:
    """Mean energy score of ``samples`` (B, S, K) for ``truth`` (B, K); lower is better."""
    return float(energy_scores(samples, truth).mean())


#: Temperatures (factors on the sampled residual) tried by :func:`calibrate_sampling`.
TEMPERATURE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)


@torch.no_grad()
def calibrate_sampling(model: Hypernet, val_latents: Tensor, val_conds: Tensor, samples: int = 4,
                       grid=CALIBRATION_GRID, seed: int = 0, max_rows: int = 400,
                       temperatures=TEMPERATURE_GRID, energy=None, pairwise=None,
                       spread: tuple[float, dict] | None = None) -> dict:
    """Choose the sampler settings and the residual temperature on validation people; updates ``model``.

    For every ``(num_steps, eta, guidance)`` of ``grid`` and every temperature (a factor on the
    sampled residual, stored as ``spread_scale``): sample ``samples`` latents per validation face
    and score them by the energy score against the validation truth, in raw latent units (a
    strictly proper scoring rule: it rewards the right spread, not the oracle's). ``energy(samples
    (n, S, K), truth (n, K)) -> (n,)`` on raw latents replaces the Euclidean energy score (e.g. one
    in delta-W space, :func:`lorasynth.training.model_parts.delta_energy`). The sampler setting with the
    best score at temperature 1 is kept. The residual is linear in the diffusion's sample, so a
    temperature scales it exactly.

    The temperature: with ``spread = (target, report)`` (the mean delta-W cosine of two LoRAs of
    people with the same face, :func:`lorasynth.training.model_parts.look_alike_spread_of`) and
    ``pairwise(x (n, S, K)) -> (n, S, S)`` (delta-W cosines of raw latents), the temperature at
    which one face's samples are as alike as that, solved over a continuous range (0.05..3, widened
    from 1 until bracketed: :func:`solve_temperature`; the grid's edges clamped at 0.5 before); the
    report records whether the target was reached, and the spread then measured on fresh samples
    (another seed) at the chosen settings (``achieved``, :func:`achieved_spread`). The energy score
    would widen the samples by the mean's own error (it scores the predictive distribution: the
    curved world's mean is 6% of the residual variance off, and the energy score then preferred
    1.1 to 1.0), which the samples of one face all share already; each draw then strays further
    from the person than real look-alikes do. Without ``spread``: a temperature other than 1 only
    when its energy score beats temperature 1 by more than twice the standard error of the
    paired difference over the validation rows (else the choice would follow sampling noise).
    """
    z = torch.as_tensor(val_latents, dtype=torch.float32)[:max_rows]
    c = torch.as_tensor(val_conds, dtype=torch.float32)[:max_rows]
    zn, cn = model.normalize_latent(z), model.normalize_cond(c)
    mean = model.conditional_mean(cn)
    model.spread_scale.fill_(1.0)
    std = model.latent_std
    scores, rows, resids = {}, {}, {}
    temps = sorted(set(temperatures) | {1.0})
    for steps, eta, g in grid:
        x = model.sample(c, num_steps=steps, eta=eta, guidance=g, seed=seed, n_samples=samples)
        res = resids[(steps, eta, g)] = model.normalize_latent(x).view(len(c), samples, -1) - mean[:, None]
        for temp in temps:
            xs = mean[:, None] + temp * res
            rows[(steps, eta, g, temp)] = (energy_scores(xs * std, zn * std) if energy is None else
                                           energy(model.denormalize_latent(xs), z).float())
            scores[(steps, eta, g, temp)] = float(rows[(steps, eta, g, temp)].mean())
    steps, eta, g = min(grid, key=lambda s_: scores[(*s_, 1.0)])
    one = (steps, eta, g, 1.0)
    by_mean = min((k for k in scores if k[:3] == one[:3]), key=scores.get)
    if spread is not None and pairwise is not None and samples > 1:
        target, spread_report = spread
        res = resids[one[:3]]
        off = ~torch.eye(samples, dtype=torch.bool)

        def alike_at(t: float) -> float:
            return float(pairwise(model.denormalize_latent(mean[:, None] + t * res))[:, off].mean())

        temp, solve = solve_temperature(alike_at, target)
        report = {"temperature_rule": "samples of one face as alike as the LoRAs of look-alike people",
                  "look_alike_spread": spread_report, "temperature_solve": solve,
                  "pairwise_cosine_by_temperature": solve["evaluations"]}
    else:
        key = by_mean
        diff = rows[one] - rows[key]
        if key != one and float(diff.mean()) <= 2 * float(diff.std()) / max(len(diff), 1) ** 0.5:
            key = one
        temp = key[3]
        report = {"temperature_rule": "energy score (a temperature other than 1 only when clearly better)"}
    model.spread_scale.fill_(temp)
    model.sampling_defaults.update(num_steps=steps, eta=eta, guidance=g, scheduler="ddim")
    if spread is not None and pairwise is not None and samples > 1:
        report["achieved"] = achieved_spread(model, c, pairwise, samples, seed + 1, spread[0], report["temperature_solve"])
    return {"chosen": {"num_steps": steps, "eta": eta, "guidance": g, "temperature": temp},
            "energy_score_at_temperature_1": scores[one], "best_temperature_by_energy": by_mean[3], **report,
            "grid": {f"steps={s},eta={e:g},guidance={gg:g},temperature={t:g}": v for (s, e, gg, t), v in scores.items()},
            "on": f"{len(c)} validation rows, energy score " + ("in raw latent units" if energy is None else "of delta W")}


#: The temperature range :func:`solve_temperature` may search (it widens from 1 towards these bounds).
TEMPERATURE_RANGE = (0.05, 3.0)
#: How far (mean pairwise delta-W cosine) the achieved spread may miss its target and count as reached.
SPREAD_TOLERANCE = 0.05


def solve_temperature(alike_at, target: float, start: float = 1.0, bounds: tuple[float, float] = TEMPERATURE_RANGE,
                      step: float = 1.5, tol: float = 0.003, max_evals: int = 16) -> tuple[float, dict]:
    """The temperature ``t`` with ``alike_at(t) == target`` (``alike_at``: the mean pairwise cosine of one
    face's samples at temperature ``t``, falling as ``t`` rises), over the continuous range ``bounds``.

    From ``start`` it steps geometrically (factor ``step``) towards the target until the target is
    bracketed or a bound is reached, then solves by regula falsi (Illinois) to ``tol``. Nothing is
    clamped silently: the report says whether the target was bracketed (``reached``) and, if not,
    which bound was hit and the cosine there (``fell_back``). Returns ``(t, report)``.
    """
    lo_b, hi_b = bounds
    seen: dict[float, float] = {}

    def f(t: float) -> float:
        t = float(min(max(t, lo_b), hi_b))
        if t not in seen:
            seen[t] = alike_at(t) - target
        return seen[t]

    def clamp(t: float) -> float:
        return float(min(max(t, lo_b), hi_b))

    a = clamp(start)
    fa, b, fb = f(a), None, 0.0
    while abs(fa) > tol and len(seen) < max_evals:  # widen towards the target (fa > 0: too alike, raise t)
        t1 = clamp(a * step if fa > 0 else a / step)
        if t1 == a:
            break  # at a bound: not bracketed
        f1 = f(t1)
        if (f1 > 0) != (fa > 0):
            b, fb = t1, f1
            break
        a, fa = t1, f1
    side = 0
    while b is not None and len(seen) < max_evals:  # regula falsi, Illinois variant
        t = clamp((a * fb - b * fa) / (fb - fa)) if fb != fa else 0.5 * (a + b)
        ft = f(t)
        if abs(ft) <= tol or abs(b - a) < 1e-4:
            break
        if (ft > 0) == (fb > 0):
            b, fb = t, ft
            fa, side = (fa / 2 if side == -1 else fa), -1
        else:
            a, fa = t, ft
            fb, side = (fb / 2 if side == 1 else fb), 1
    best = min(seen, key=lambda x: abs(seen[x]))
    reached = b is not None or abs(seen[best]) <= tol
    report = {"target": target, "temperature": round(best, 4), "reached": bool(reached),
              "cosine_at_temperature": seen[best] + target, "range": list(bounds),
              "evaluations": {f"{x:.4g}": v + target for x, v in sorted(seen.items())}}
    if not reached:
        report["fell_back"] = (f"spread target {target:.3f} not reachable in temperatures {lo_b:g}..{hi_b:g}: "
                               f"at {best:g} samples reach {seen[best] + target:.3f}")
    return round(best, 4), report


@torch.no_grad()
def achieved_spread(model: Hypernet, conds: Tensor, pairwise, samples: int, seed: int, target: float,
                    solve: dict) -> dict:
    """The spread calibration achieved, measured on fresh samples (another seed) at the chosen settings."""
    x = model.sample(conds, seed=seed, n_samples=samples).view(len(conds), samples, -1)
    off = ~torch.eye(samples, dtype=torch.bool)
    got = float(pairwise(x)[:, off].mean())
    ok = bool(solve.get("reached")) and abs(got - target) <= SPREAD_TOLERANCE
    out = {"pairwise_cosine": got, "target": target, "gap": got - target, "seed": seed,
           "target_reached": ok, "tolerance": SPREAD_TOLERANCE}
    if not ok:
        out["fell_back"] = solve.get("fell_back") or (
            f"samples reach pairwise delta-W cosine {got:.3f} against the look-alike target {target:.3f} "
            f"(more than {SPREAD_TOLERANCE} apart) at temperature {float(model.spread_scale.mean()):g}")
    return out


def temperature_for_spread(alike: dict[float, float], target: float) -> float:
    """The temperature whose samples' mean pairwise cosine is ``target`` (``alike``: temperature ->
    pairwise cosine, falling as the temperature rises), linearly interpolated, clamped to the grid."""
    temps = sorted(alike)
    if target >= alike[temps[0]]:
        return temps[0]
    for lo, hi in zip(temps, temps[1:]):
        if alike[hi] <= target:
            span = alike[lo] - alike[hi]
            frac = (alike[lo] - target) / span if span > 0 else 0.0
            return round(lo + frac * (hi - lo), 3)
    return temps[-1]
