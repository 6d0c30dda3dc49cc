"""PCA of standardised LoRA vectors: the weights2weights baseline.

weights2weights standardises every column of the identity-LoRA matrix, takes its principal
directions, represents an identity by its first ``k`` coefficients (``k = 1000``) and samples
new identities by drawing every coefficient from a normal with that coefficient's dataset
mean and std. :func:`fit_pca` reproduces that on a pack.

Fitting never holds an ``N x D`` float64 copy. Small problems (``N * D * 4`` bytes under
``exact_max_bytes``) load the standardised rows once and take an exact SVD. Large ones
(the w2w layout: ``D = 99,648``, ``N = 20,000``: 8 GB) use a randomised SVD (Halko,
Martinsson & Tropp 2011, range finder with ``n_iter`` power iterations) that *streams* the
rows from disk in batches: every pass over the data is a batched ``X @ M`` or ``X^T @ M``
with ``M`` of ``k + oversample`` columns, so memory is ``O((N + D) (k + oversample))``.
Passes: 1 (mean and first range) + 2 per power iteration + 1 (projection) + 1 (coefficient
statistics).

A fitted model is exported as ``pca.safetensors`` (tensors) + ``pca.json`` (sizes, layout
signature, explained variance); loading never unpickles.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lorasynth.core.lora import fix_signs
from lorasynth.core.safe_io import write_json, write_safetensors
from lorasynth.errors import ModelError
from lorasynth.core.numbers import validate_fields
from lorasynth.models.latent.export import Reader, read_export
from lorasynth.library.pack import Pack, std_floor
from lorasynth.models.latent.base import row_stats

PCA_VERSION = 1
WEIGHTS_FILE = "pca.safetensors"
META_FILE = "pca.json"


@dataclass(eq=False)
class PCA:
    """A fitted PCA: ``x ~ center + z @ components.T`` in standardised space."""

    components: torch.Tensor  # (D, k) orthonormal columns, by decreasing variance
    center: torch.Tensor  # (D,) mean of the standardised fitting rows (~0 on the full pack)
    singular_values: torch.Tensor  # (k,)
    coef_mean: torch.Tensor  # (k,) dataset mean of every coefficient
    coef_std: torch.Tensor  # (k,) dataset std of every coefficient
    mean: torch.Tensor  # (D,) raw column mean (standardisation)
    scale: torch.Tensor  # (D,) raw column scale (floored std)
    layout_signature: str = ""
    n_fit: int = 0
    total_variance: float = 0.0  # mean squared norm of the centred standardised rows
    kind: str = "pca"

    # ---------------------------------------------------------------- sizes
    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def latent_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance(self) -> torch.Tensor:
        """Variance of every coefficient over the fitting rows (``S^2 / N``)."""
        return self.singular_values.double() ** 2 / max(self.n_fit, 1)

    @property
    def explained_variance_ratio(self) -> float:
        """Fraction of the total standardised variance the ``k`` components keep."""
        return float(self.explained_variance.sum() / self.total_variance) if self.total_variance else float("nan")

    # ---------------------------------------------------------------- API shared with the VAE
    def standardize(self, raw) -> torch.Tensor:
        return (torch.as_tensor(raw, dtype=torch.float32) - self.mean) / self.scale

    def destandardize(self, x) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32) * self.scale + self.mean

    def encode(self, x) -> torch.Tensor:
        """Standardised ``(n, D)`` -> coefficients ``(n, k)``."""
        return (torch.as_tensor(x, dtype=torch.float32) - self.center) @ self.components

    def decode(self, z) -> torch.Tensor:
        """Coefficients ``(n, k)`` -> standardised ``(n, D)``; zeros give the mean LoRA."""
        return self.center + torch.as_tensor(z, dtype=torch.float32) @ self.components.T

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Every coefficient from a normal with its dataset mean and std (as w2w samples)."""
        eps = torch.randn(n, self.latent_dim, generator=generator)
        return self.coef_mean + self.coef_std * eps

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.sample_latent(n, generator))

    def eval(self) -> "PCA":  # for code that treats every latent model like an nn.Module
        return self

    # ---------------------------------------------------------------- files
    def export(self, out_dir: str | Path) -> Path:
        """Write ``pca.safetensors`` + ``pca.json`` into ``out_dir`` (files replaced atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "components": self.components, "center": self.center, "singular_values": self.singular_values,
            "coef_mean": self.coef_mean, "coef_std": self.coef_std, "mean": self.mean, "scale": self.scale,
        }
        meta = {
            "format": "lorasynth-pca", "version": PCA_VERSION, "dim": self.dim, "latent_dim": self.latent_dim,
            "layout_signature": self.layout_signature, "n_fit": self.n_fit, "total_variance": self.total_variance,
            "explained_variance_ratio": self.explained_variance_ratio,
        }
        write_safetensors({k: v.contiguous().float() for k, v in tensors.items()}, out / WEIGHTS_FILE,
                          {"format": "lorasynth-pca"})
        write_json(out / META_FILE, meta)
        return out

    @classmethod
    def load(cls, path: str | Path, read: Reader | None = None) -> "PCA":
        """Load an exported PCA; ``read``: where the files come from (default: the folder)."""
        path = Path(path)
        meta, t = read_export(path, META_FILE, WEIGHTS_FILE, "PCA model", "lorasynth-pca", PCA_VERSION, read=read)
        cfg = PCAMeta.from_dict(meta, f"{path / META_FILE}")
        d, k = cfg.dim, cfg.latent_dim
        want = {"components": (d, k), "center": (d,), "singular_values": (k,), "coef_mean": (k,), "coef_std": (k,),
                "mean": (d,), "scale": (d,)}
        for name, shape in want.items():
            if name not in t or tuple(t[name].shape) != shape:
                raise ModelError(f"PCA model in {path}: tensor {name!r} missing or not of shape {shape}")
        return cls(**{n: t[n] for n in want}, layout_signature=cfg.layout_signature, n_fit=cfg.n_fit,
                   total_variance=cfg.total_variance)


@dataclass
class PCAMeta:
    """The schema of ``pca.json`` (sizes and fit statistics; every field type- and range-checked)."""

    dim: int
    latent_dim: int
    layout_signature: str = ""
    n_fit: int = 0
    total_variance: float = 0.0

    @classmethod
    def from_dict(cls, meta: dict, where: str) -> "PCAMeta":
        if "dim" not in meta or "latent_dim" not in meta:
            raise ModelError(f"{where}: dim and latent_dim are required")
        out = cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})
        validate_fields(out, where, {"dim": (1, 2**31), "latent_dim": (1, 2**20), "n_fit": (0, None),
                                     "total_variance": (0.0, None)}, error=ModelError)
        return out


# --------------------------------------------------------------------------- fitting


class _Source:
    """Standardised row batches of a Pack (read from disk) or of an in-memory raw array."""

    def __init__(self, data, idx, mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        if isinstance(data, Pack):
            self.pack, self.array = data, None
            if mean is not None and scale is not None:
                self.mean, self.scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
            elif idx is None or len(np.unique(np.asarray(idx))) == data.n:
                self.mean, self.scale = data.mean, data.scale
            else:  # statistics of the fitting rows only: held-out rows never shape the model
                self.mean, self.scale = row_stats(data, idx)
            self.layout_signature = data.layout.signature
            n = data.n
        else:
            arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            self.pack, self.array = None, arr.astype(np.float32, copy=False)
            rows = self.array if idx is None else self.array[np.asarray(idx)]
            self.mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32) if mean is None else np.asarray(mean, np.float32)
            self.scale = std_floor(rows.std(axis=0, dtype=np.float64)) if scale is None else np.asarray(scale, np.float32)
            self.layout_signature = ""
            n = len(self.array)
        self.idx = np.arange(n) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        self.dim = len(self.mean)

    def read(self, part: np.ndarray) -> torch.Tensor:
        raw = self.pack.read_rows(part) if self.pack is not None else self.array[part]
        return torch.from_numpy((raw - self.mean) / self.scale)

    def batches(self, batch_rows: int):
        for start in range(0, len(self.idx), batch_rows):
            yield slice(start, min(start + batch_rows, len(self.idx))), self.read(self.idx[start : start + batch_rows])


def fit_pca(
    data,
    k: int,
    idx=None,
    *,
    n_iter: int = 2,
    oversample: int = 10,
    seed: int = 0,
    batch_rows: int | None = None,
    exact_max_bytes: int = 64 << 20,
    mean: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> PCA:
    """Fit a ``k``-component PCA on the standardised rows ``idx`` (all by default) of ``data``.

    Args:
        data: a :class:`~lorasynth.library.pack.Pack` (its stats standardise the rows) or raw vectors
            ``(N, D)`` (standardised with ``mean``/``scale``, or with their own column stats).
        k: number of components; at most ``min(len(idx), D)``.
        n_iter, oversample, seed: randomised-SVD settings (streaming path only).
        batch_rows: rows per streamed batch (default: about 64 MB of float32).
        exact_max_bytes: use an exact in-memory SVD when the fitting rows take at most this.
    """
    src = _Source(data, idx, mean, scale)
    n, d = len(src.idx), src.dim
    if not 1 <= k <= min(n, d):
        raise ModelError(f"PCA with k={k} components needs 1 <= k <= min(rows={n}, dim={d})")
    batch_rows = batch_rows or max(1, (64 << 20) // (4 * d))
    if n * d * 4 <= exact_max_bytes:
        comps, svals, center, total = _exact(src)
    else:
        comps, svals, center, total = _randomized(src, k, n_iter, oversample, seed, batch_rows)
    comps, svals = comps[:, :k].contiguous(), svals[:k].contiguous()
    # coefficient statistics (w2w samples every coefficient from N(mean_j, std_j))
    s1 = torch.zeros(k, dtype=torch.float64)
    s2 = torch.zeros(k, dtype=torch.float64)
    for _, xb in src.batches(batch_rows):
        c = ((xb - center) @ comps).double()
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
    coef_mean = s1 / n
    coef_std = (s2 / n - coef_mean**2).clamp_min(0).sqrt()
    return PCA(
        components=comps.float(), center=center.float(), singular_values=svals.float(),
        coef_mean=coef_mean.float(), coef_std=coef_std.float(),
        mean=torch.from_numpy(np.array(src.mean, dtype=np.float32)), scale=torch.from_numpy(np.array(src.scale, dtype=np.float32)),
        layout_signature=src.layout_signature, n_fit=n, total_variance=float(total),
    )


def _exact(src: _Source):
    x = src.read(src.idx).double()
    center = x.mean(0)
    x -= center
    total = float((x * x).sum() / len(x))
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = _component_signs(vh.T)
    return comps, s, center, total


def _randomized(src: _Source, k: int, n_iter: int, oversample: int, seed: int, batch_rows: int):
    n, d = len(src.idx), src.dim
    width = min(k + oversample, n, d)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(d, width, generator=g)
    # pass 1: column mean, total variance, and Y = X @ omega (centred afterwards)
    y = torch.empty(n, width)
    s1 = torch.zeros(d, dtype=torch.float64)
    sq = 0.0
    for sl, xb in src.batches(batch_rows):
        s1 += xb.double().sum(0)
        sq += float((xb.double() ** 2).sum())
        y[sl] = xb @ omega
    center = (s1 / n).float()
    total = sq / n - float((s1 / n).pow(2).sum())
    y -= center @ omega

    def xt_times(q: torch.Tensor) -> torch.Tensor:  # X_c^T q, (d, width)
        acc = torch.zeros(d, q.shape[1])
        for sl, xb in src.batches(batch_rows):
            acc.addmm_(xb.T, q[sl])
        return acc - center[:, None] * q.sum(0)[None, :]

    def x_times(m: torch.Tensor) -> torch.Tensor:  # X_c m, (n, width)
        out = torch.empty(n, m.shape[1])
        for sl, xb in src.batches(batch_rows):
            out[sl] = xb @ m
        return out - center @ m

    for _ in range(n_iter):
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(xt_times(q))
        y = x_times(z)
    q, _ = torch.linalg.qr(y)
    bt = xt_times(q)  # B^T = X_c^T Q, (d, width); X_c ~ Q B
    qb, rb = torch.linalg.qr(bt.double())
    _, s, vrh = torch.linalg.svd(rb.T)  # B = rb^T qb^T = (U S Vr^T) qb^T
    comps = _component_signs((qb @ vrh.T).float())
    return comps, s.float(), center, total


def _component_signs(v: torch.Tensor) -> torch.Tensor:
    """Deterministic component signs: the project's one sign rule (:func:`lorasynth.core.lora.fix_signs`)."""
    return fix_signs(v, v.new_zeros(v.shape[-1], 0))[0]


__all__ = ["PCA", "fit_pca"]
