"""The LoRA-VAE network in plain torch: architecture, standardisation, export and loading.

See :mod:`lorasynth.training.latent` for the architecture and training (the Lightning module
:class:`~lorasynth.training.latent.LoRAVAE` subclasses :class:`VAENet`). Loading an exported VAE
(:func:`lorasynth.models.latent.load_latent`) needs only this module, so synthesis imports no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorasynth.errors import ModelError
from lorasynth.models.latent.export import read_export
from lorasynth.core.safe_io import write_json, write_safetensors

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

    def __init__(self, tokens: int, p_in: int, p_out: int, init: bool = True):
        super().__init__()
        # init=False: uninitialised memory for weights about to be loaded (the chunk maps are the
        # bulk of the VAE; drawing them costs 50 ms for nothing on every load)
        w = torch.randn(tokens, p_in, p_out) / math.sqrt(p_in) if init else torch.empty(tokens, p_in, p_out)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(tokens, p_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btp,tpq->btq", x, self.weight) + self.bias


def transformer_stack(cfg: VAEConfig, layers: int) -> nn.Module:
    if layers == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, dim_feedforward=cfg.ff_mult * cfg.d_model, dropout=cfg.dropout,
        activation="gelu", batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class VAENet(nn.Module):
    """VAE over standardised LoRA vectors of one layout (input size ``dim``).

    Args:
        config: architecture and loss settings.
        dim: input size ``D``.
        mean, scale: the pack's raw column mean and floored std (``Pack.mean``, ``Pack.scale``),
            kept as buffers so :meth:`standardize`/:meth:`destandardize` travel with the model.
        layout_signature: signature of the layout (checked by users of the model).
        lr: the training learning rate (recorded in ``vae.json``; used by :class:`~lorasynth.training.latent.LoRAVAE`).
        init_weights: False leaves the chunk maps uninitialised (:meth:`load` fills every weight).

    Plain torch: loading and decoding import no Lightning. :class:`~lorasynth.training.latent.LoRAVAE`
    (the training module) is this network plus the Lightning training steps.
    """

    kind = "vae"

    def __init__(self, config: VAEConfig | dict, dim: int, mean=None, scale=None,
                 layout_signature: str = "", lr: float = 1e-3, init_weights: bool = True):
        super().__init__()
        config = VAEConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self._dim = int(dim)
        self._layout_signature = layout_signature
        self.lr = lr
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
        self.enc_chunk = ChunkLinear(t, p, r, init_weights)
        self.enc_in = nn.Linear(r, d)
        self.enc_pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.encoder = transformer_stack(config, config.enc_layers)
        self.enc_norm = nn.LayerNorm(d)
        self.enc_squeeze = nn.Linear(d, config.token_dim)
        self.to_stats = nn.Linear(t * config.token_dim, 2 * m)
        # decoder
        self.from_latent = nn.Linear(m, t * config.token_dim)
        self.dec_expand = nn.Linear(config.token_dim, d)
        self.dec_pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.decoder = transformer_stack(config, config.dec_layers)
        self.dec_norm = nn.LayerNorm(d)
        self.dec_out = nn.Linear(d, r)
        self.dec_chunk = ChunkLinear(t, r, p, init_weights)
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
        write_safetensors(state, out / WEIGHTS_FILE, {"format": "lorasynth-vae"})
        write_json(out / META_FILE, meta)
        return out

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "VAENet":
        """Load an exported VAE (eval mode)."""
        path = Path(path)
        meta, state = read_export(path, META_FILE, WEIGHTS_FILE, "VAE", "lorasynth-vae", VAE_VERSION, map_location)
        try:
            model = cls(VAEConfig.from_dict(meta["config"]), int(meta["dim"]),
                        layout_signature=str(meta.get("layout_signature", "")), lr=float(meta.get("lr", 1e-3)),
                        init_weights=False)
            model.load_state_dict(state, strict=True)  # strict: every weight comes from the file
        except (KeyError, TypeError, RuntimeError) as e:
            raise ModelError(f"VAE in {path} does not match its vae.json ({e})") from None
        return model.to(map_location).eval()


__all__ = ["VAEConfig", "VAENet", "ChunkLinear", "chunk_geometry", "VAE_VERSION", "WEIGHTS_FILE", "META_FILE"]
