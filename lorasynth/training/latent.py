"""The LoRA-VAE: a variational autoencoder of standardised flattened LoRA vectors.

LoRA Diffusion (Smith et al. 2024) compresses identity LoRAs with a VAE (latent ``m = 512``,
Gaussian prior) before learning a conditional model in the latent space. Here the input is
a standardised vector of any layout, up to ``D ~ 100k`` (the w2w layout: 99,648).

Architecture ("chunked autoencoder"), and why it scales
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

Files: :meth:`LoRAVAE.export` writes ``vae.safetensors`` (weights and the standardisation
``mean``/``scale`` buffers, so the model alone maps latents to raw LoRA vectors) and
``vae.json`` (config, sizes, layout signature); :meth:`LoRAVAE.load` never unpickles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import lightning
import torch
from torch import nn

from lorasynth.training.lightning import TrainConfig, cosine_warmup_lr, fit, long_epoch_sampler
from lorasynth.models.latent.vae import (  # noqa: F401  (re-exported: the network lives in vae_net, free of Lightning)
    META_FILE, VAE_VERSION, WEIGHTS_FILE, ChunkLinear, VAEConfig, VAENet, transformer_stack, chunk_geometry,
)


class LoRAVAE(VAENet, lightning.LightningModule):
    """The LoRA-VAE for training: :class:`VAENet` plus the Lightning training steps.

    Args: as :class:`VAENet`; ``lr`` is the peak AdamW learning rate (cosine decay to 5% over the
    trainer's ``max_steps``). :meth:`VAENet.load` on this class returns a ``LoRAVAE``.
    """

    def __init__(self, config: VAEConfig | dict, dim: int, mean=None, scale=None,
                 layout_signature: str = "", lr: float = 1e-3, init_weights: bool = True):
        super().__init__(config, dim, mean, scale, layout_signature, lr, init_weights)  # VAENet, then LightningModule
        # plain values only: checkpoints are loaded with weights_only=True
        self.hparams.update({"config": asdict(self.config), "dim": self._dim, "layout_signature": layout_signature,
                             "lr": lr})

    # ---------------------------------------------------------------- training
    def beta(self) -> float:
        warm = self.config.kl_warmup
        return self.config.beta_max * (1.0 if warm <= 0 else min(1.0, self.global_step / warm))

    def _losses(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = x + self.config.input_noise * torch.randn_like(x) if train and self.config.input_noise else x
        mu, logvar = self.posterior(x_in)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if train else mu
        if train and self.config.latent_noise:
            z = z + self.config.latent_noise * torch.randn_like(z)
        recon = nn.functional.mse_loss(self.decode(z), x)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
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
) -> LoRAVAE:
    """Train a LoRA-VAE on rows ``train_idx`` of a pack (all rows by default).

    Checkpoints, logs and ``loss_curve.png`` go to ``out_dir`` (see :mod:`lorasynth.training.lightning`);
    ``resume=True`` continues from ``out_dir/checkpoints/last.ckpt``. Validation on
    ``val_idx`` (if given) runs every ``train_cfg.val_every`` steps or once per epoch.
    Returns the trained model in eval mode (call :meth:`LoRAVAE.export` to save it).
    """
    from torch.utils.data import DataLoader

    from lorasynth.library.pack import PackDataset
    from lorasynth.models.latent import row_stats

    vae_cfg = vae_cfg or VAEConfig()
    train_cfg = train_cfg or TrainConfig()
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


__all__ = ["VAEConfig", "VAENet", "LoRAVAE", "ChunkLinear", "chunk_geometry", "train_vae"]
