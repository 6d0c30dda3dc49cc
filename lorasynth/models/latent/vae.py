"""The LoRA-VAE network in plain torch: architecture, standardisation, export and loading.

Two architectures (``VAEConfig.arch``):

* ``"pca_residual"`` (the default, format version 2): **never worse than PCA of the same size.**
  A linear path that *is* PCA (encoder = projection on the first ``k`` principal directions of the
  standardised training rows, decoder = the PCA reconstruction; both fixed buffers) plus small
  nonlinear residual MLPs whose last layers start at zero: the encoder's adds a correction to the
  ``k`` coefficients from the first ``K = k + residual_components`` coefficients, the decoder's adds
  coefficients on all ``K`` principal directions from the latent. At initialisation the model is PCA
  exactly; training keeps the best state on validation people and falls back to the linear path when
  the residual does not help (:func:`lorasynth.training.latent.train_vae`). The latent is in PCA
  coefficient units (``sample_latent`` draws each coefficient from its dataset normal, as w2w), so the
  hypernetwork sees the same space as with PCA. Curved worlds need fewer latent dimensions: the
  decoder bends the ``k``-dim latent through the next principal directions.
* ``"chunked"`` (format version 1, and files written before version 2): the chunked transformer
  autoencoder described in :mod:`lorasynth.training.latent`.

The Lightning module :class:`~lorasynth.training.latent.LoRAVAE` subclasses :class:`VAENet`. Loading an
exported VAE (:func:`lorasynth.models.latent.load_latent`) needs only this module, so synthesis imports
no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorasynth.errors import ModelError
from lorasynth.models.latent.export import Reader, read_export
from lorasynth.core.numbers import parse_float, parse_int, validate_fields
from lorasynth.core.safe_io import write_json, write_safetensors

VAE_VERSION = 2  # 2: ``config.arch`` (and the PCA-residual architecture); 1: the chunked architecture only
READ_VERSIONS = (1, 2)  # versions this module still loads
ARCHS = ("pca_residual", "chunked")
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
    arch: str = "pca_residual"  # or "chunked" (the version-1 network; the fields above up to ff_mult)
    residual_components: int = 64  # pca_residual: principal directions beyond the latent the decoder may use
    residual_width: int = 256  # pca_residual: hidden width of the residual MLPs
    residual_layers: int = 2  # pca_residual: hidden layers of the decoder's residual MLP (0: PCA only)
    encoder_layers: int = 1  # pca_residual: hidden layers of the encoder's residual MLP (0: the PCA projection)
    posterior_logvar: float = -7.0  # pca_residual: initial log-variance of q(z|x), in whitened latent units

    def __post_init__(self) -> None:
        """Every field's type and range (a hostile ``vae.json`` is one ModelError line, never a traceback)."""
        validate_fields(self, "VAE config", VAE_BOUNDS, error=ModelError)
        if self.arch not in ARCHS:
            raise ModelError(f"VAE config: arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"[:300])
        if self.d_model % self.n_heads:
            raise ModelError(f"VAE config: d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        if not isinstance(d, dict):
            raise ModelError(f"VAE config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_SIZE = (1, 65536)
_STEPS = (0, 2**31)
#: ranges of the VAE config fields (sizes are bounded so that a crafted config cannot ask for terabytes)
VAE_BOUNDS = {
    "latent_dim": _SIZE, "n_tokens": _SIZE, "min_chunk": (1, 2**31), "chunk_rank": _SIZE, "token_dim": _SIZE,
    "d_model": _SIZE, "n_heads": (1, 4096), "enc_layers": (0, 256), "dec_layers": (0, 256), "ff_mult": (1, 256),
    "dropout": (0.0, 1.0), "beta_max": (0.0, 1e6), "kl_warmup": _STEPS, "input_noise": (0.0, 1e6),
    "latent_noise": (0.0, 1e6), "weight_decay": (0.0, 1e6), "lr_warmup": _STEPS,
    "residual_components": (0, 65536), "residual_width": _SIZE, "residual_layers": (0, 256), "encoder_layers": (0, 256),
    "posterior_logvar": (-30.0, 10.0),
}


def chunk_geometry(dim: int, cfg: VAEConfig) -> tuple[int, int, int]:
    """``(T, P, r)``: number of chunks, chunk length, per-chunk rank for a ``dim``-vector."""
    tokens = max(1, min(cfg.n_tokens, math.ceil(dim / max(1, cfg.min_chunk))))
    chunk = math.ceil(dim / tokens)
    return tokens, chunk, min(cfg.chunk_rank, chunk)


def expected_shapes(cfg: VAEConfig, dim: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the weights that fix every size a :class:`VAENet` of ``cfg`` allocates.

    :meth:`VAENet.load` compares them with the file before building the network, so a crafted
    ``vae.json`` (``d_model: 65536``, ``enc_layers: 200``) is refused without allocating its weights.
    """
    if cfg.arch == "pca_residual":
        return residual_shapes(cfg, dim)
    t, p, r = chunk_geometry(dim, cfg)
    d, m, k = cfg.d_model, cfg.latent_dim, cfg.token_dim
    out = {"mean": (dim,), "enc_chunk.weight": (t, p, r), "dec_chunk.weight": (t, r, p), "enc_in.weight": (d, r),
           "to_stats.weight": (2 * m, t * k), "from_latent.weight": (t * k, m), "dec_expand.weight": (d, k)}
    for stack, layers in (("encoder", cfg.enc_layers), ("decoder", cfg.dec_layers)):
        for i in range(layers):
            out[f"{stack}.layers.{i}.linear1.weight"] = (cfg.ff_mult * d, d)
    return out


def basis_size(cfg: VAEConfig, dim: int) -> int:
    """``K``: the principal directions a PCA-residual VAE keeps (its latent's ``k`` and the residual's)."""
    return min(dim, cfg.latent_dim + cfg.residual_components)


def residual_mlp(n_in: int, width: int, layers: int, n_out: int) -> nn.Module | None:
    """``layers`` hidden GELU layers of ``width``, then a linear output that starts at exactly zero."""
    if layers == 0:
        return None
    parts: list[nn.Module] = []
    for i in range(layers):
        parts += [nn.Linear(n_in if i == 0 else width, width), nn.GELU()]
    out = nn.Linear(width, n_out)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*parts, out)


def residual_shapes(cfg: VAEConfig, dim: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a PCA-residual VAE and its shape (checked before allocating, as :func:`expected_shapes`)."""
    k, big_k, w = cfg.latent_dim, basis_size(cfg, dim), cfg.residual_width
    out = {"mean": (dim,), "scale": (dim,), "center": (dim,), "basis": (dim, big_k), "coef_mean": (k,),
           "coef_std": (k,), "out_scale": (big_k,), "logvar": (k,)}
    mlps = (("enc_res", big_k, cfg.encoder_layers, k), ("dec_res", k, cfg.residual_layers, big_k))
    for name, n_in, layers, n_out in mlps:
        for i in range(layers + (layers > 0)):
            a, b = (n_in if i == 0 else w), (n_out if i == layers else w)
            out[f"{name}.{2 * i}.weight"], out[f"{name}.{2 * i}.bias"] = (b, a), (b,)
    return out


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
                 layout_signature: str = "", lr: float = 1e-3, init_weights: bool = True, pca=None):
        super().__init__()
        config = VAEConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self._dim = int(dim)
        self._layout_signature = layout_signature
        self.lr = lr
        self.selection: dict | None = None  # what training chose on validation people (exported in vae.json)
        if pca is not None:  # the linear path's standardisation is the PCA's
            mean, scale = pca.mean, pca.scale
        mean = torch.zeros(dim) if mean is None else torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        scale = torch.ones(dim) if scale is None else torch.as_tensor(np.asarray(scale), dtype=torch.float32)
        if mean.shape != (dim,) or scale.shape != (dim,):
            raise ModelError(f"mean/scale must have shape ({dim},)")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())
        if config.arch == "pca_residual":
            self._build_residual(pca)
        else:
            self._build_chunked(init_weights)

    def _build_residual(self, pca) -> None:
        """The PCA linear path (buffers; zeros until loaded when ``pca`` is None) and the residual MLPs."""
        cfg, dim = self.config, self._dim
        k, big_k = cfg.latent_dim, basis_size(cfg, dim)
        if k > dim:
            raise ModelError(f"VAE latent_dim ({k}) exceeds the input size ({dim})")
        basis, center = torch.zeros(dim, big_k), torch.zeros(dim)
        coef_mean, coef_std, out_scale = torch.zeros(k), torch.ones(k), torch.ones(big_k)
        if pca is not None:
            if pca.dim != dim or pca.latent_dim < big_k:
                raise ModelError(f"the VAE's linear path needs a PCA of {big_k} components on {dim} values, got "
                                 f"{pca.latent_dim} on {pca.dim}")
            std = pca.coef_std[:big_k].float()
            floor = max(float(std.max()) * 1e-6, 1e-12)  # a constant direction: no division by zero
            basis, center = pca.components[:, :big_k].float(), pca.center.float()
            coef_mean, coef_std, out_scale = pca.coef_mean[:k].float(), std[:k].clamp_min(floor), std.clamp_min(floor)
        for name, value in (("center", center), ("basis", basis), ("coef_mean", coef_mean), ("coef_std", coef_std),
                            ("out_scale", out_scale)):
            self.register_buffer(name, value.clone().contiguous())
        self.logvar = nn.Parameter(torch.full((k,), float(cfg.posterior_logvar)))
        self.enc_res = residual_mlp(big_k, cfg.residual_width, cfg.encoder_layers, k)
        self.dec_res = residual_mlp(k, cfg.residual_width, cfg.residual_layers, big_k)

    def _build_chunked(self, init_weights: bool) -> None:
        """The version-1 chunked transformer autoencoder (see :mod:`lorasynth.training.latent`)."""
        config = self.config
        t, p, r = chunk_geometry(self._dim, config)
        self.tokens, self.chunk, self.rank = t, p, r
        d, m = config.d_model, config.latent_dim
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

    @property
    def residual_arch(self) -> bool:
        return self.config.arch == "pca_residual"

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """PCA-residual: standardised ``x (B, D)`` -> ``(B, K + 1)``: its coefficients on the ``K`` principal
        directions and, last, the squared norm of what they miss (the training data of the residual:
        the reconstruction error in standardised space is a function of these alone)."""
        xc = torch.as_tensor(x, dtype=torch.float32, device=self.mean.device) - self.center
        coef = xc @ self.basis
        miss = (xc.double().pow(2).sum(1) - coef.double().pow(2).sum(1)).clamp_min(0).float()
        return torch.cat([coef, miss[:, None]], dim=1)

    def encode_coefficients(self, coef: torch.Tensor) -> torch.Tensor:
        """PCA-residual: the latent mean from the ``K`` coefficients: the first ``k`` plus the encoder's residual."""
        mu = coef[:, : self.latent_dim]
        if self.enc_res is not None:
            mu = mu + self.coef_std * self.enc_res(coef / self.out_scale)
        return mu

    def decode_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """PCA-residual: latent ``(B, k)`` -> coefficients ``(B, K)``: the latent itself (PCA) plus the
        decoder's residual."""
        out = nn.functional.pad(z, (0, self.basis.shape[1] - z.shape[1]))
        if self.dec_res is not None:
            out = out + self.out_scale * self.dec_res((z - self.coef_mean) / self.coef_std)
        return out

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of q(z | x) for standardised ``x (B, D)``."""
        if x.ndim != 2 or x.shape[1] != self._dim:
            raise ModelError(f"VAE expects inputs of shape (batch, {self._dim}), got {tuple(x.shape)}")
        if self.residual_arch:
            mu = self.encode_coefficients(self.coefficients(x)[:, :-1])
            return mu, (self.logvar + 2 * self.coef_std.log()).expand_as(mu)
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
        if self.residual_arch:
            return self.center + self.decode_coefficients(z) @ self.basis.T
        h = self.dec_expand(self.from_latent(z).reshape(z.shape[0], self.tokens, self.config.token_dim)) + self.dec_pos
        h = self.dec_norm(self.decoder(h))
        out = self.dec_chunk(self.dec_out(h)).flatten(1)
        return out[:, : self._dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (posterior mean) of standardised ``x``."""
        return self.decode(self.encode(x))

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """From the prior: N(0, 1) (chunked), every coefficient from its dataset normal (PCA-residual, as w2w)."""
        eps = torch.randn(n, self.latent_dim, generator=generator).to(self.mean.device)
        return self.coef_mean + self.coef_std * eps if self.residual_arch else eps

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
        if self.selection is not None:
            meta["selection"] = self.selection
        write_safetensors(state, out / WEIGHTS_FILE, {"format": "lorasynth-vae"})
        write_json(out / META_FILE, meta)
        return out

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu", read: Reader | None = None) -> "VAENet":
        """Load an exported VAE (eval mode); ``read``: where the files come from (default: the folder)."""
        path = Path(path)
        meta, state = read_export(path, META_FILE, WEIGHTS_FILE, "VAE", "lorasynth-vae", READ_VERSIONS, map_location, read)
        where = f"{path / META_FILE}"
        raw_config = meta.get("config")
        if meta.get("version") == 1 and isinstance(raw_config, dict):  # version 1 knew one architecture
            raw_config = {**raw_config, "arch": "chunked"}
        config = VAEConfig.from_dict(raw_config)
        dim = parse_int(meta.get("dim"), f"{where}: dim", minimum=1, maximum=2**31, error=ModelError, strict=True)
        lr = parse_float(meta.get("lr", 1e-3), f"{where}: lr", minimum=0.0, error=ModelError, strict=True)
        signature = meta.get("layout_signature", "")
        if not isinstance(signature, str):
            raise ModelError(f"{where}: layout_signature must be a string")
        for key, want in expected_shapes(config, dim).items():  # before allocating: the config's sizes are the file's
            got = state.get(key)
            if got is None or tuple(got.shape) != want:
                raise ModelError(f"VAE in {path} does not match its vae.json: size mismatch for {key}: the file holds "
                                 f"{'nothing' if got is None else tuple(got.shape)}, the config needs {want}")
        model = cls(config, dim, layout_signature=signature, lr=lr, init_weights=False)
        try:
            model.load_state_dict(state, strict=True)  # strict: every weight comes from the file
        except (KeyError, TypeError, RuntimeError) as e:
            raise ModelError(f"VAE in {path} does not match its vae.json ({e})") from None
        if isinstance(meta.get("selection"), dict):
            model.selection = meta["selection"]
        return model.to(map_location).eval()


__all__ = ["VAEConfig", "VAENet", "ChunkLinear", "chunk_geometry", "basis_size", "residual_mlp", "VAE_VERSION",
           "READ_VERSIONS", "WEIGHTS_FILE", "META_FILE"]
