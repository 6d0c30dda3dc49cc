"""A planted-structure synthetic world of identity LoRAs and face embeddings.

Real identity LoRAs (the 26 GB weights2weights set) and a face embedder cannot be assumed
in tests, benchmarks or the demo, so this module plants the structure the methods are
meant to find, with a known ground truth:

* every identity ``i`` has hidden factors ``z_i ~ N(0, I_k)`` (``k = n_factors``, default 8);
* its LoRA is a *nonlinear* function of ``z_i``: a fixed random 2-layer tanh MLP maps
  ``z`` to a small code per module, fixed random per-module bases turn the code into the
  module's factors ``up = U0 + Ub.c``, ``down = A0 + Ab.c`` (so ``delta W = up @ down`` is
  bilinear in the code), plus small per-identity noise; the factors are then put in
  canonical form (:func:`lorasynth.lora.canonicalize_module`, batched). The LoRAs lie near a
  curved ``k``-dimensional manifold in a ``D``-dimensional space;
* its face embedding is a *different* nonlinear map of ``z_i`` (another tanh MLP), plus
  noise, L2-normalised (as ArcFace / dlib embeddings are compared).

Design choices that make the world a useful test:

* the shared part of ``down`` (``A0``) is weak, so the mean LoRA has a small delta-W cosine
  with any one identity: predicting the mean is a poor answer;
* ``k = 8`` hidden factors with a few thousand identities leave nearest neighbours far
  apart, and the manifold is curved, so nearest-neighbour and kernel blending (which
  averages towards the mean) lose to a learned conditional model;
* every ``up`` column carries one dominant "spike" coordinate, so the canonical sign rule
  (largest entry of U positive) never flips across identities: the vectors depend on
  ``z`` smoothly, as a learnable world should (real data is harder here);
* the vectors are already canonical, so ``layout.flatten(layout.unflatten(v)) == v``
  (up to float error), exactly what a pack built from LoRA files would hold.

Rows are generated on demand from ``(seed, i)``: only the small fixed maps and the ``N x k``
factors / ``N x embed_dim`` embeddings are held in memory, never ``N x D`` (20,000 identities
in the w2w layout would be 8 GB). ``vectors(idx)`` does not depend on how rows are batched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .layout import W2W_TARGETS, Layout, delta_cosine  # noqa: F401  (delta_cosine re-exported)
from .lora import LoRA

#: The miniature SD1.5 UNet (``lorasynth.tiny``, size "tiny") cross-attention blocks a
#: to_q/to_v LoRA touches: width 32, text-context width 32.
TINY_BLOCKS = ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
TINY_WIDTH = 32
TINY_CONTEXT = 32


def tiny_layout(rank: int = 1) -> Layout:
    """The w2w-style layout for the tiny test UNet: 3 blocks x to_q/to_v of attn1/attn2.

    12 modules of 32x32, rank 1 by default: ``D = 768``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for block in TINY_BLOCKS:
        for target in W2W_TARGETS:
            in_features = TINY_CONTEXT if target == "attn2.to_v" else TINY_WIDTH
            shapes[f"unet.{block}.transformer_blocks.0.{target}"] = (TINY_WIDTH, in_features)
    return Layout.for_targets(shapes, W2W_TARGETS, rank=rank)


@dataclass
class SyntheticWorldConfig:
    """Size and difficulty of a planted world.

    Attributes:
        n_identities: number of identities ``N``.
        layout: the LoRA layout of every identity (:func:`tiny_layout`, ``Layout.w2w()``...).
        n_factors: hidden factors per identity (the manifold dimension).
        embed_dim: face-embedding size (ArcFace is 512, dlib 128).
        embed_noise: norm of the noise added to the unit signal embedding (before the final
            normalisation): how much an embedding tells about its identity.
        seed: everything (maps, factors, noise) is drawn from it.
        hidden: width of the factors -> codes MLP.
        codes_per_module: code size per module (the module's basis count).
        gain: pre-activation scale of the tanh layers; larger = more curved manifold.
        mean_strength: norm of the shared part of ``down`` relative to its variation; small
            = the mean LoRA is a poor answer.
        up_variation: norm of the identity part of ``up`` relative to its shared part.
        spike: size of the dominant coordinate of every shared ``up`` column (keeps the
            canonical sign stable; see the module docstring).
        lora_noise: per-identity i.i.d. noise, relative to a typical factor entry.
        delta_norm: typical Frobenius norm of one module's delta W.
    """

    n_identities: int
    layout: Layout
    n_factors: int = 8
    embed_dim: int = 128
    embed_noise: float = 0.05
    seed: int = 0
    hidden: int = 64
    codes_per_module: int = 4
    gain: float = 1.5
    mean_strength: float = 0.3
    up_variation: float = 0.6
    spike: float = 1.0
    lora_noise: float = 0.02
    delta_norm: float = 0.5


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# stream tags, so that the draws of different quantities never share a random stream
_MAPS, _FACTORS, _EMBED, _NOISE = 1, 2, 3, 4


@dataclass
class _ModuleMaps:
    """Fixed per-module maps: shared factors and bases (all float64)."""

    u0: np.ndarray  # (out, r)
    ub: np.ndarray  # (q, out, r)
    a0: np.ndarray  # (r, in)
    ab: np.ndarray  # (q, r, in)
    noise_up: float
    noise_down: float


@dataclass
class SyntheticWorld:
    """A planted world: hidden factors, embeddings, and LoRA vectors made on demand."""

    config: SyntheticWorldConfig
    factors: np.ndarray  # (N, k) float64
    embeddings: np.ndarray  # (N, E) float32, unit norm
    _w1: np.ndarray = field(repr=False)
    _b1: np.ndarray = field(repr=False)
    _w2: np.ndarray = field(repr=False)
    _b2: np.ndarray = field(repr=False)
    _modules: list[_ModuleMaps] = field(repr=False)

    @property
    def layout(self) -> Layout:
        return self.config.layout

    @property
    def n(self) -> int:
        return self.config.n_identities

    @property
    def dim(self) -> int:
        return self.layout.size

    def __len__(self) -> int:
        return self.n

    def ids(self, idx: Sequence[int] | None = None) -> list[str]:
        """Stable entry ids (``id00042``) for identities ``idx`` (all by default)."""
        idx = range(self.n) if idx is None else idx
        width = max(5, len(str(self.n - 1)))
        return [f"id{int(i):0{width}d}" for i in idx]

    # ---------------------------------------------------------------- rows
    def codes(self, idx: Sequence[int]) -> np.ndarray:
        """Per-module codes ``(n, M, q)`` of identities ``idx`` (the nonlinear part)."""
        z = self.factors[np.asarray(idx, dtype=np.int64)]
        h = np.tanh(z @ self._w1 + self._b1)
        c = np.tanh(h @ self._w2 + self._b2)
        return c.reshape(len(z), len(self._modules), self.config.codes_per_module)

    def vectors(self, idx: Sequence[int]) -> np.ndarray:
        """Raw (unstandardised) canonical LoRA vectors ``(len(idx), D)`` float32."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"identity index out of range 0..{self.n - 1}")
        codes = self.codes(idx)
        noise = np.empty((len(idx), self.dim), dtype=np.float32)
        for row, i in enumerate(idx):
            noise[row] = _rng(self.config.seed, _NOISE, i).standard_normal(self.dim, dtype=np.float32)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        pos = 0
        for m, (spec, maps) in enumerate(zip(self.layout.modules, self._modules)):
            r, n_in = spec.down_shape[0], math.prod(spec.down_shape[1:])
            n_out = spec.up_shape[0]
            nd, nu = r * n_in, n_out * r
            c = codes[:, m, :]
            down = maps.a0 + np.einsum("nq,qri->nri", c, maps.ab)
            up = maps.u0 + np.einsum("nq,qor->nor", c, maps.ub)
            down += maps.noise_down * noise[:, pos : pos + nd].reshape(-1, r, n_in)
            up += maps.noise_up * noise[:, pos + nd : pos + nd + nu].reshape(-1, n_out, r)
            b, a = _canonical_batch(torch.from_numpy(up), torch.from_numpy(down))
            out[:, pos : pos + nd] = a.reshape(len(idx), nd).numpy()
            out[:, pos + nd : pos + nd + nu] = b.reshape(len(idx), nu).numpy()
            pos += nd + nu
        return out

    def vector(self, i: int) -> np.ndarray:
        """Raw canonical LoRA vector ``(D,)`` float32 of identity ``i``."""
        return self.vectors([i])[0]

    def lora(self, i: int) -> LoRA:
        """Identity ``i`` as a LoRA (alpha = rank, scale 1)."""
        return self.layout.unflatten(torch.from_numpy(self.vector(i)))

    def iter_batches(self, idx: Sequence[int] | None = None, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """``(vectors, embeddings, ids)`` batches over ``idx`` (all identities by default)."""
        idx = np.arange(self.n) if idx is None else np.asarray(idx, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            yield self.vectors(part), self.embeddings[part], self.ids(part)


def _canonical_batch(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`~lorasynth.lora.canonicalize_module` of ``delta W = up @ down``.

    ``up (n, out, r)``, ``down (n, r, in)`` in float64 -> canonical ``(B, A)`` of the same shapes.
    """
    qb, rb = torch.linalg.qr(up)
    qa, ra = torch.linalg.qr(down.transpose(1, 2))
    uc, s, vhc = torch.linalg.svd(rb @ ra.transpose(1, 2))
    u = qb @ uc
    vh = vhc @ qa.transpose(1, 2)
    idx = u.abs().argmax(dim=1, keepdim=True)  # (n, 1, r)
    signs = torch.sign(torch.gather(u, 1, idx))
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs.transpose(1, 2)
    root = s.clamp_min(0).sqrt()
    return u * root[:, None, :], root[:, :, None] * vh


def make_world(cfg: SyntheticWorldConfig) -> SyntheticWorld:
    """Draw a world from ``cfg.seed``: the same config always gives the same world."""
    layout, q, k = cfg.layout, cfg.codes_per_module, cfg.n_factors
    rng = _rng(cfg.seed, _MAPS)
    w1 = rng.standard_normal((k, cfg.hidden)) * cfg.gain / math.sqrt(k)
    b1 = rng.standard_normal(cfg.hidden) * 0.5
    w2 = rng.standard_normal((cfg.hidden, len(layout) * q)) * cfg.gain / math.sqrt(cfg.hidden)
    b2 = rng.standard_normal(len(layout) * q) * 0.3
    c_rms = 0.6  # typical |tanh| output: scales the bases so the variation has the intended norm
    root = math.sqrt(cfg.delta_norm)
    modules = []
    for spec in layout.modules:
        r, n_in, n_out = spec.down_shape[0], math.prod(spec.down_shape[1:]), spec.up_shape[0]
        u0 = rng.standard_normal((n_out, r)) / math.sqrt(n_out)
        u0[rng.integers(n_out, size=r), np.arange(r)] += cfg.spike * np.where(rng.random(r) < 0.5, -1.0, 1.0)
        u0 /= np.linalg.norm(u0, axis=0, keepdims=True)
        ub = rng.standard_normal((q, n_out, r)) * cfg.up_variation / (c_rms * math.sqrt(q * n_out))
        a0 = rng.standard_normal((r, n_in)) * cfg.mean_strength / math.sqrt(n_in)
        ab = rng.standard_normal((q, r, n_in)) / (c_rms * math.sqrt(q * n_in))
        modules.append(
            _ModuleMaps(
                u0=u0 * root / math.sqrt(r),
                ub=ub * root / math.sqrt(r),
                a0=a0 * root / math.sqrt(r),
                ab=ab * root / math.sqrt(r),
                noise_up=cfg.lora_noise * root / math.sqrt(n_out * r),
                noise_down=cfg.lora_noise * root / math.sqrt(n_in * r),
            )
        )
    factors = _rng(cfg.seed, _FACTORS).standard_normal((cfg.n_identities, k))
    embeddings = _embed(factors, cfg)
    return SyntheticWorld(cfg, factors, embeddings, w1, b1, w2, b2, modules)


def _embed(factors: np.ndarray, cfg: SyntheticWorldConfig) -> np.ndarray:
    """Factors -> unit embeddings through a different random tanh MLP, plus noise."""
    rng = _rng(cfg.seed, _EMBED)
    k, hidden, e = factors.shape[1], 2 * cfg.hidden, cfg.embed_dim
    v1 = rng.standard_normal((k, hidden)) * cfg.gain / math.sqrt(k)
    c1 = rng.standard_normal(hidden) * 0.5
    v2 = rng.standard_normal((hidden, e)) / math.sqrt(hidden)
    reference = _rng(cfg.seed, _EMBED, 2).standard_normal((4096, k))  # fixed centring, independent of N
    signal = np.tanh(factors @ v1 + c1) @ v2
    signal -= (np.tanh(reference @ v1 + c1) @ v2).mean(axis=0, keepdims=True)
    signal /= np.linalg.norm(signal, axis=1, keepdims=True) + 1e-12
    noise = _rng(cfg.seed, _EMBED, 1).standard_normal(signal.shape) * cfg.embed_noise / math.sqrt(e)
    emb = signal + noise
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


def train_test_split(n: int, test_frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random split of ``range(n)`` into sorted ``(train_idx, test_idx)`` int64 arrays.

    At least one item lands in each part when ``n >= 2`` and ``0 < test_frac < 1``.
    """
    if not 0.0 <= test_frac <= 1.0:
        raise ValueError(f"test_frac must be in [0, 1], got {test_frac}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_frac))
    if n >= 2 and 0.0 < test_frac < 1.0:
        n_test = min(max(n_test, 1), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --------------------------------------------------------------------------- delta-W geometry


# delta_cosine lives with the other flat-vector geometry in lorasynth.layout (re-exported here).


def write_world_pack(world: SyntheticWorld, out_dir: str | Path, idx: Sequence[int] | None = None,
                     batch_size: int = 128, overwrite: bool = False) -> Path:
    """Write identities ``idx`` (all by default) of ``world`` as a pack (see :mod:`lorasynth.pack`)."""
    from .pack import PackWriter

    idx = np.arange(world.n) if idx is None else np.asarray(idx, dtype=np.int64)
    with PackWriter(out_dir, world.layout, len(idx), world.config.embed_dim, embedder="synthetic",
                    overwrite=overwrite) as writer:
        for vectors, embeddings, ids in world.iter_batches(idx, batch_size):
            writer.add_batch(vectors, embeddings, ids)
    return Path(out_dir)
