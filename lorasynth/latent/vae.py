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

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ModelError
from .export import read_export
from ..training import TrainConfig, cosine_warmup_lr, fit, long_epoch_sampler
from .pca import _atomic_save

VAE_VERSION = 1
WEIGHTS_FILE = "vae.safetensors"
META_FILE = "vae.json"


@dataclass
class VAEConfig:
    """Shape and training knobs of the LoRA-VAE (see the module docstring)."""

    latent_dim: int = 512
    n_tokens: int = 64  # at most this many chunks
    min_chunk: int = 32  # chunks are never shorter (small layouts get fewer tokens)
    chunk_rank: int = 32  # private per-chunk projection size r
    token_dim: int = 16  # per-token width at the bottleneck (flattened: T * token_dim)
    d_model: int = 64
    n_heads: int = 4
    enc_layers: int = 1
    dec_layers: int = 1
    ff_mult: int = 2
    dropout: float = 0.0
    beta_max: float = 1e-4
    kl_warmup: int = 500  # steps
    input_noise: float = 1e-3
    latent_noise: float = 0.0
    weight_decay: float = 0.0
    lr_warmup: int = 100  # steps of linear learning-rate warm-up before the cosine decay

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def chunk_geometry(dim: int, cfg: VAEConfig) -> tuple[int, int, int]:
    """``(T, P, r)``: number of chunks, chunk length, per-chunk rank for a ``dim``-vector."""
    tokens = max(1, min(cfg.n_tokens, math.ceil(dim / max(1, cfg.min_chunk))))
    chunk = math.ceil(dim / tokens)
    return tokens, chunk, min(cfg.chunk_rank, chunk)


class ChunkLinear(nn.Module):
    """A separate linear map per chunk: ``(B, T, p_in) -> (B, T, p_out)`` with weights ``(T, p_in, p_out)``."""

    def __init__(self, tokens: int, p_in: int, p_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(tokens, p_in, p_out) / math.sqrt(p_in))
        self.bias = nn.Parameter(torch.zeros(tokens, p_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btp,tpq->btq", x, self.weight) + self.bias


def _transformer(cfg: VAEConfig, layers: int) -> nn.Module:
    if layers == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, dim_feedforward=cfg.ff_mult * cfg.d_model, dropout=cfg.dropout,
        activation="gelu", batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class LoRAVAE(lightning.LightningModule):
    """VAE over standardised LoRA vectors of one layout (input size ``dim``).

    Args:
        config: architecture and loss settings.
        dim: input size ``D``.
        mean, scale: the pack's raw column mean and floored std (``Pack.mean``, ``Pack.scale``),
            kept as buffers so :meth:`standardize`/:meth:`destandardize` travel with the model.
        layout_signature: signature of the layout (checked by users of the model).
        lr: peak AdamW learning rate (cosine decay to 5% over the trainer's ``max_steps``).
    """

    kind = "vae"

    def __init__(self, config: VAEConfig | dict, dim: int, mean=None, scale=None,
                 layout_signature: str = "", lr: float = 1e-3):
        super().__init__()
        config = VAEConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self._dim = int(dim)
        self._layout_signature = layout_signature
        self.lr = lr
        # plain values only: checkpoints are loaded with weights_only=True
        self.hparams.update({"config": asdict(config), "dim": self._dim, "layout_signature": layout_signature, "lr": lr})
        t, p, r = chunk_geometry(self._dim, config)
        self.tokens, self.chunk, self.rank = t, p, r
        d, m = config.d_model, config.latent_dim
        mean = torch.zeros(dim) if mean is None else torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        scale = torch.ones(dim) if scale is None else torch.as_tensor(np.asarray(scale), dtype=torch.float32)
        if mean.shape != (dim,) or scale.shape != (dim,):
            raise ModelError(f"mean/scale must have shape ({dim},)")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())
        # encoder
        self.enc_chunk = ChunkLinear(t, p, r)
        self.enc_in = nn.Linear(r, d)
        self.enc_pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.encoder = _transformer(config, config.enc_layers)
        self.enc_norm = nn.LayerNorm(d)
        self.enc_squeeze = nn.Linear(d, config.token_dim)
        self.to_stats = nn.Linear(t * config.token_dim, 2 * m)
        # decoder
        self.from_latent = nn.Linear(m, t * config.token_dim)
        self.dec_expand = nn.Linear(config.token_dim, d)
        self.dec_pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.decoder = _transformer(config, config.dec_layers)
        self.dec_norm = nn.LayerNorm(d)
        self.dec_out = nn.Linear(d, r)
        self.dec_chunk = ChunkLinear(t, r, p)
        with torch.no_grad():  # start near the mean (x = 0) and an N(0, 1) posterior
            self.to_stats.weight.mul_(0.1)
            self.to_stats.bias.zero_()

    # ---------------------------------------------------------------- sizes
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def layout_signature(self) -> str:
        return self._layout_signature

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- standardisation
    def standardize(self, raw) -> torch.Tensor:
        return (torch.as_tensor(raw, dtype=torch.float32, device=self.mean.device) - self.mean) / self.scale

    def destandardize(self, x) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32, device=self.mean.device) * self.scale + self.mean

    # ---------------------------------------------------------------- networks
    def _chunks(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.tokens * self.chunk - self._dim
        if pad:
            x = nn.functional.pad(x, (0, pad))
        return x.reshape(x.shape[0], self.tokens, self.chunk)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of q(z | x) for standardised ``x (B, D)``."""
        if x.ndim != 2 or x.shape[1] != self._dim:
            raise ModelError(f"VAE expects inputs of shape (batch, {self._dim}), got {tuple(x.shape)}")
        h = self.enc_in(self.enc_chunk(self._chunks(x))) + self.enc_pos
        h = self.enc_squeeze(self.enc_norm(self.encoder(h)))
        mu, logvar = self.to_stats(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)

    def encode(self, x) -> torch.Tensor:
        """Standardised ``(B, D)`` -> latent mean ``(B, m)``."""
        return self.posterior(torch.as_tensor(x, dtype=torch.float32, device=self.mean.device))[0]

    def decode(self, z) -> torch.Tensor:
        """Latent ``(B, m)`` -> standardised ``(B, D)``."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self.mean.device)
        h = self.dec_expand(self.from_latent(z).reshape(z.shape[0], self.tokens, self.config.token_dim)) + self.dec_pos
        h = self.dec_norm(self.decoder(h))
        out = self.dec_chunk(self.dec_out(h)).flatten(1)
        return out[:, : self._dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (posterior mean) of standardised ``x``."""
        return self.decode(self.encode(x))

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator).to(self.mean.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.sample_latent(n, generator))

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

    # ---------------------------------------------------------------- files
    def export(self, out_dir: str | Path) -> Path:
        """Write ``vae.safetensors`` + ``vae.json`` into ``out_dir`` (each replaced atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "format": "lorasynth-vae", "version": VAE_VERSION, "config": asdict(self.config), "dim": self._dim,
            "latent_dim": self.latent_dim, "layout_signature": self._layout_signature, "lr": self.lr,
            "num_parameters": self.num_parameters(),
        }
        _atomic_save(out / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "lorasynth-vae"}))
        _atomic_save(out / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2), encoding="utf-8"))
        return out

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "LoRAVAE":
        """Load an exported VAE (eval mode)."""
        path = Path(path)
        meta, state = read_export(path, META_FILE, WEIGHTS_FILE, "VAE", "lorasynth-vae", VAE_VERSION, map_location)
        try:
            model = cls(VAEConfig.from_dict(meta["config"]), int(meta["dim"]),
                        layout_signature=str(meta.get("layout_signature", "")), lr=float(meta.get("lr", 1e-3)))
            model.load_state_dict(state, strict=True)
        except (KeyError, TypeError, RuntimeError) as e:
            raise ModelError(f"VAE in {path} does not match its vae.json ({e})") from None
        return model.to(map_location).eval()


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

    Checkpoints, logs and ``loss_curve.png`` go to ``out_dir`` (see :mod:`lorasynth.training`);
    ``resume=True`` continues from ``out_dir/checkpoints/last.ckpt``. Validation on
    ``val_idx`` (if given) runs every ``train_cfg.val_every`` steps or once per epoch.
    Returns the trained model in eval mode (call :meth:`LoRAVAE.export` to save it).
    """
    from torch.utils.data import DataLoader

    from ..pack import PackDataset
    from . import row_stats

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


__all__ = ["VAEConfig", "LoRAVAE", "ChunkLinear", "chunk_geometry", "train_vae"]
