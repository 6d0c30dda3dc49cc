"""The LoRA-VAE: a variational autoencoder of standardised flattened LoRA vectors.

LoRA Diffusion (Smith et al. 2024) compresses identity LoRAs with a VAE (latent ``m = 512``,
Gaussian prior) before learning a conditional model in the latent space. Here the input is
a standardised vector of any layout, up to ``D ~ 100k`` (the w2w layout: 99,648).

The default architecture: PCA plus a nonlinear residual (never worse than PCA)
----------------------------------------------------------------------------------
``VAEConfig.arch = "pca_residual"`` (see :mod:`lorasynth.models.latent.vae`): :func:`train_vae` fits
PCA with ``K = k + residual_components`` directions on the training rows; the network's linear path is
that PCA's first ``k`` (it *is* PCA at initialisation: the residual MLPs' outputs start at zero). The
reconstruction error in standardised space depends on a row only through its ``K`` coefficients and the
squared norm they miss, so training reads each row once and then runs on ``(N, K + 1)`` coefficient rows:
fast at any ``D``. Loss: that exact standardised MSE plus ``beta`` times the KL of the whitened latent.
On validation people the ΔW-cosine reconstruction is measured before training (the linear path: PCA) and
at every validation step; the best state is kept, so on them the VAE is never below PCA of its size
(``vae.json`` ``selection`` records the scores and whether the residual was kept).

The version-1 architecture ("chunked autoencoder", ``arch = "chunked"``), and why it scales
-------------------------------------------------------
A dense MLP would need ``D x hidden`` weights per side (51M for the w2w layout at width 512)
and the same number of multiply-adds per item. Instead:

1. **Chunks.** The vector is zero-padded and cut into ``T`` equal chunks of ``P`` values,
   ``T = min(n_tokens, ceil(D / min_chunk))`` (64 tokens of 1,557 for w2w; 24 of 32 for
   the tiny layout). Chunks are contiguous slices, so they follow the layout's module order.
2. **Private chunk maps.** Every chunk has its *own* linear map ``P -> r`` (``chunk_rank``,
   32), batched as one ``einsum`` (a locally connected layer): a learned per-chunk
   projection, like a per-block PCA. A map shared by all chunks would force every chunk's
   content into one common ``d``-dim subspace, which the different modules of a LoRA do
   not share. Cost: ``D x r`` weights per side, i.e. the only term that grows with ``D``,
   with a small constant (32 weights per input value instead of 512).
3. **Token mixer.** ``r -> d_model`` plus a learned position embedding, then a small
   pre-norm transformer encoder (``enc_layers``) over the ``T`` tokens: cross-module
   interactions at ``O(T d^2)`` per item, independent of ``D``.
4. **Bottleneck.** Every token is squeezed to ``token_dim`` (16) values and the ``T x 16``
   grid is flattened (token positions are fixed, so a positional linear read-out is the
   natural pooling) into ``mu, logvar`` of the latent: ``O(T)`` weights, not ``O(D)``.
5. **Decoder, mirrored.** latent -> ``T x token_dim`` -> ``T x d`` tokens (+ position
   embedding) -> transformer (``dec_layers``) -> ``d -> r`` -> private ``r -> P`` map per
   chunk with a per-position bias (which holds any residual mean) -> crop to ``D``.

Parameter count ``~ 2 D r`` (chunk maps) ``+ 3 T t m`` (bottleneck, ``t = token_dim``,
``m = latent_dim``) ``+ 8 L d^2`` (transformer, ``L`` layers). With the defaults
(``T = 64, r = 32, t = 16, m = 512, d = 64``, 1+1 layers) the w2w layout gives 8,135,792
parameters (6.48M chunk maps, 1.57M bottleneck, 67k transformer) and the tiny layout
718,512. Per item the forward pass costs about the same number of multiply-adds plus
``~ 8 L T d^2`` for the transformer: ~13M for w2w, i.e. a hundred-odd items/s on one CPU
core for training. ``d_model``/layers can be raised for more capacity (d=128, 2+2 layers:
8.6M parameters but ~3x slower on CPU, since the transformer then dominates).

Training: ``loss = MSE(x_hat, x) + beta * KL`` with MSE over standardised values and KL
summed over latent dimensions (averaged over the batch); ``beta`` ramps linearly from 0
to ``beta_max`` over ``kl_warmup`` steps (KL warm-up avoids posterior collapse early on).
Noise augmentation as in p-diff: Gaussian noise of std ``input_noise`` on the input (the
target stays clean) and optionally ``latent_noise`` on the sampled latent. The module logs
``train_loss``, ``recon``, ``kl`` and ``beta`` (and ``val_loss``/``val_recon``).

The chunked network loses to PCA of the same size on held-out planted LoRAs (w2w latent 512: 0.965
against 0.9995), which is why the PCA-residual network replaced it as the default.

Files: :meth:`LoRAVAE.export` writes ``vae.safetensors`` (weights and the standardisation
``mean``/``scale`` buffers, so the model alone maps latents to raw LoRA vectors) and
``vae.json`` (config, sizes, layout signature); :meth:`LoRAVAE.load` never unpickles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import lightning
import numpy as np
import torch
from torch import nn

from lorasynth.training.lightning import TrainConfig, cosine_warmup_lr, fit, last_checkpoint, long_epoch_sampler
from lorasynth.models.latent.vae import (  # noqa: F401  (re-exported: the network lives in vae_net, free of Lightning)
    META_FILE, VAE_VERSION, WEIGHTS_FILE, ChunkLinear, VAEConfig, VAENet, transformer_stack, chunk_geometry,
)


class LoRAVAE(VAENet, lightning.LightningModule):
    """The LoRA-VAE for training: :class:`VAENet` plus the Lightning training steps.

    Args: as :class:`VAENet`; ``lr`` is the peak AdamW learning rate (cosine decay to 5% over the
    trainer's ``max_steps``). :meth:`VAENet.load` on this class returns a ``LoRAVAE``.
    """

    def __init__(self, config: VAEConfig | dict, dim: int, mean=None, scale=None,
                 layout_signature: str = "", lr: float = 1e-3, init_weights: bool = True, pca=None):
        super().__init__(config, dim, mean, scale, layout_signature, lr, init_weights, pca)  # VAENet, then LightningModule
        # plain values only: checkpoints are loaded with weights_only=True
        self.hparams.update({"config": asdict(self.config), "dim": self._dim, "layout_signature": layout_signature,
                             "lr": lr})

    # ---------------------------------------------------------------- training
    def beta(self) -> float:
        warm = self.config.kl_warmup
        return self.config.beta_max * (1.0 if warm <= 0 else min(1.0, self.global_step / warm))

    def _losses(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.residual_arch:
            return self._coefficient_losses(x, train)
        x_in = x + self.config.input_noise * torch.randn_like(x) if train and self.config.input_noise else x
        mu, logvar = self.posterior(x_in)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if train else mu
        if train and self.config.latent_noise:
            z = z + self.config.latent_noise * torch.randn_like(z)
        recon = nn.functional.mse_loss(self.decode(z), x)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
        return recon, kl

    def _coefficient_losses(self, rows: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA-residual: the exact standardised MSE and the whitened KL from coefficient rows
        ``(B, K + 1)`` (:meth:`VAENet.coefficients`)."""
        coef, miss = rows[:, :-1], rows[:, -1]
        mu = self.encode_coefficients(coef)
        std = self.coef_std * torch.exp(0.5 * self.logvar)
        z = mu + std * torch.randn_like(mu) if train else mu
        if train and self.config.latent_noise:
            z = z + self.config.latent_noise * self.coef_std * torch.randn_like(z)
        err = (self.decode_coefficients(z) - coef).pow(2).sum(1) + miss
        recon = err.mean() / self._dim  # = mean over the D values of the squared standardised error
        white = (mu - self.coef_mean) / self.coef_std
        kl = 0.5 * (white.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=1).mean()
        return recon, kl

    @staticmethod
    def _x(batch) -> torch.Tensor:
        if isinstance(batch, dict):
            return batch["x"]
        if isinstance(batch, (tuple, list)):
            return batch[0]
        return batch

    def training_step(self, batch, batch_idx):
        recon, kl = self._losses(self._x(batch), train=True)
        beta = self.beta()
        loss = recon + beta * kl
        self.log_dict({"train_loss": loss, "recon": recon, "kl": kl, "beta": beta}, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        recon, kl = self._losses(self._x(batch), train=False)
        self.log_dict({"val_loss": recon + self.beta() * kl, "val_recon": recon}, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.99), weight_decay=self.config.weight_decay)
        total = max(1, int(getattr(self.trainer, "max_steps", 0) or 1))
        warm = min(self.config.lr_warmup, total // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_warmup_lr(step, warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_vae(
    pack,
    out_dir: str | Path,
    vae_cfg: VAEConfig | None = None,
    train_cfg: TrainConfig | None = None,
    train_idx=None,
    val_idx=None,
    resume: bool = False,
    model: LoRAVAE | None = None,
    pca=None,
) -> LoRAVAE:
    """Train a LoRA-VAE on rows ``train_idx`` of a pack (all rows by default).

    Checkpoints, logs and ``loss_curve.png`` go to ``out_dir`` (see :mod:`lorasynth.training.lightning`);
    ``resume=True`` continues from ``out_dir/checkpoints/last.ckpt``. Validation on
    ``val_idx`` (if given) runs every ``train_cfg.val_every`` steps or once per epoch.
    Returns the trained model in eval mode (call :meth:`LoRAVAE.export` to save it).

    The PCA-residual architecture (the default) fits its PCA here (``pca``: one already fitted on the
    same rows with at least ``K`` components), trains on coefficient rows and keeps the state with the
    best ΔW-cosine reconstruction of the validation rows, the PCA linear path included
    (``model.selection``); without validation rows it keeps the last state.
    """
    vae_cfg = vae_cfg or VAEConfig()
    train_cfg = train_cfg or TrainConfig()
    if vae_cfg.arch == "pca_residual":
        return train_residual_vae(pack, out_dir, vae_cfg, train_cfg, train_idx, val_idx, resume, model, pca)
    from torch.utils.data import DataLoader

    from lorasynth.library.pack import PackDataset
    from lorasynth.models.latent import row_stats

    if model is None:
        lightning.seed_everything(train_cfg.seed, verbose=False)
        mean, scale = (pack.mean, pack.scale) if train_idx is None else row_stats(pack, train_idx)
        model = LoRAVAE(vae_cfg, pack.dim, mean=mean, scale=scale,
                        layout_signature=pack.layout.signature, lr=train_cfg.lr)
    train_ds = PackDataset(pack, train_idx)
    loader_kw = dict(batch_size=train_cfg.batch_size, num_workers=train_cfg.num_workers,
                     persistent_workers=train_cfg.num_workers > 0)
    if val_idx is not None and len(val_idx) and train_cfg.val_every is None:
        # training runs as one long epoch (see long_epoch_sampler): validate 4 times in it
        train_cfg = dataclasses.replace(train_cfg, val_every=max(1, train_cfg.max_steps // 4))
    train = DataLoader(train_ds, sampler=long_epoch_sampler(len(train_ds), train_cfg),
                       drop_last=len(train_ds) > train_cfg.batch_size, **loader_kw)
    val = DataLoader(PackDataset(pack, val_idx), shuffle=False, **loader_kw) if val_idx is not None and len(val_idx) else None
    fit(model, (train, val), out_dir, train_cfg, resume=resume)
    return model.eval()


def residual_components_for(cfg: VAEConfig, n_train: int, dim: int) -> VAEConfig:
    """``cfg`` with its latent and residual directions capped by the data (``K <= min(N, D)``)."""
    k = min(cfg.latent_dim, n_train, dim)
    q = max(0, min(cfg.residual_components, n_train - k, dim - k))
    return dataclasses.replace(cfg, latent_dim=k, residual_components=q)


@torch.no_grad()
def coefficient_rows(model: VAENet, pack, idx, batch: int = 256) -> torch.Tensor:
    """:meth:`VAENet.coefficients` of pack rows ``idx`` (read once, in batches): ``(n, K + 1)`` float32."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    out = [model.coefficients(model.standardize(pack.read_rows(idx[s : s + batch]))).cpu()
           for s in range(0, len(idx), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.basis.shape[1] + 1)


class BestOnValidation(lightning.Callback):
    """Keep the module state with the highest mean of ``score(module)`` (per validation row; measured after
    every validation and at the end of training) that beats ``baseline`` (the per-row scores and the state
    of the PCA linear path) by more than ``margin`` paired standard errors: a gain within the noise of the
    validation rows would not carry to new people, so the baseline stays."""

    def __init__(self, score, baseline: tuple[np.ndarray, dict], margin: float = 2.0):
        self.score, self.margin = score, margin
        self.base_rows, self.best_state = np.asarray(baseline[0], dtype=np.float64), baseline[1]
        self.best = float(self.base_rows.mean())
        self.best_step = 0
        self.history: list[tuple[int, float]] = [(0, round(self.best, 6))]

    def consider(self, trainer, module) -> None:
        step = int(trainer.global_step)
        if self.history[-1][0] == step and step:
            return
        rows = np.asarray(self.score(module), dtype=np.float64)
        value = float(rows.mean())
        self.history.append((step, round(value, 6)))
        diff = rows - self.base_rows
        noise = self.margin * float(diff.std(ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if value > self.best and float(diff.mean()) > noise:
            self.best, self.best_step = value, step
            self.best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.consider(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.consider(trainer, module)


def linear_path_state(model: VAENet) -> dict:
    """``model``'s state with both residual MLPs' outputs zeroed: exactly its PCA linear path."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for net in ("enc_res", "dec_res"):
        mlp = getattr(model, net)
        if mlp is not None:
            last = len(mlp) - 1
            state[f"{net}.{last}.weight"].zero_()
            state[f"{net}.{last}.bias"].zero_()
    return state


def train_residual_vae(pack, out_dir, vae_cfg: VAEConfig, train_cfg: TrainConfig, train_idx=None, val_idx=None,
                       resume: bool = False, model: LoRAVAE | None = None, pca=None) -> LoRAVAE:
    """:func:`train_vae` for the PCA-residual architecture (see the module docstring)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lorasynth.models.latent import reconstruction_cosine
    from lorasynth.models.latent.pca import fit_pca

    train_idx = np.arange(pack.n) if train_idx is None else np.asarray(train_idx, dtype=np.int64)
    if model is None:
        vae_cfg = residual_components_for(vae_cfg, len(train_idx), pack.dim)
        big_k = vae_cfg.latent_dim + vae_cfg.residual_components
        if pca is None or pca.latent_dim < big_k:
            pca = fit_pca(pack, big_k, idx=train_idx)
        lightning.seed_everything(train_cfg.seed, verbose=False)
        model = LoRAVAE(vae_cfg, pack.dim, layout_signature=pack.layout.signature, lr=train_cfg.lr, pca=pca)
    ckpt = last_checkpoint(out_dir) if resume else None
    if ckpt is not None:  # the coefficients below need the run's linear path (a model passed in may not have it)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    has_val = val_idx is not None and len(val_idx) > 0
    loader_kw = dict(batch_size=train_cfg.batch_size, num_workers=0)
    train_rows = TensorDataset(coefficient_rows(model, pack, train_idx))
    train = DataLoader(train_rows, sampler=long_epoch_sampler(len(train_rows), train_cfg),
                       drop_last=len(train_rows) > train_cfg.batch_size, **loader_kw)
    val, callbacks, keeper = None, [], None
    if has_val:
        val_idx = np.asarray(val_idx, dtype=np.int64)
        if train_cfg.val_every is None:
            train_cfg = dataclasses.replace(train_cfg, val_every=max(1, train_cfg.max_steps // 4))
        val = DataLoader(TensorDataset(coefficient_rows(model, pack, val_idx)), shuffle=False, **loader_kw)

        def score(m) -> np.ndarray:
            return reconstruction_cosine(m, pack, val_idx, metric="delta", per_item=True)

        linear = linear_path_state(model)
        current = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(linear)
        pca_rows = score(model)
        model.load_state_dict(current)
        keeper = BestOnValidation(score, (pca_rows, linear))
        callbacks.append(keeper)
    fit(model, (train, val), out_dir, train_cfg, resume=resume, extra_callbacks=callbacks)
    if keeper is not None:
        model.load_state_dict(keeper.best_state)
        model.selection = {
            "metric": "validation reconstruction, ΔW cosine", "validation_rows": int(len(val_idx)),
            "pca_linear_path": round(keeper.history[0][1], 6), "chosen": round(keeper.best, 6),
            "chosen_step": keeper.best_step, "residual_used": keeper.best_step > 0,
            "history": [list(h) for h in keeper.history],
            "rule": f"the residual is kept where it beats the linear path by more than {keeper.margin:g} paired "
                    "standard errors",
        }
    return model.eval()


__all__ = ["VAEConfig", "VAENet", "LoRAVAE", "ChunkLinear", "chunk_geometry", "train_vae", "train_residual_vae",
           "BestOnValidation", "coefficient_rows", "linear_path_state", "residual_components_for"]
