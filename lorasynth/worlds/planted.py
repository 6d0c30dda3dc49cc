"""A planted-structure synthetic world of identity LoRAs and face embeddings.

Real identity LoRAs (the 26 GB weights2weights set) and a face embedder cannot be assumed
in tests, benchmarks or the demo, so this module plants the structure the methods are
meant to find, with a known ground truth:

* every identity ``i`` has hidden factors ``z_i ~ N(0, I_k)`` (``k = n_factors``, default 8);
* its LoRA is a *nonlinear* function of ``z_i``: a fixed random 2-layer tanh MLP maps
  ``z`` to a small code per module, fixed random per-module bases turn the code into the
  module's factors ``up = U0 + Ub.c``, ``down = A0 + Ab.c`` (so ``delta W = up @ down`` is
  bilinear in the code), plus small per-identity noise; the factors are then put in
  canonical form (:func:`lorasynth.core.lora.canonicalize_module`, batched). The LoRAs lie near a
  curved ``k``-dimensional manifold in a ``D``-dimensional space;
* its face embedding is a *different* nonlinear map of ``z_i`` (another tanh MLP), plus
  noise, L2-normalised (as ArcFace / dlib embeddings are compared). In the hard worlds the
  noise is *photo noise* on the factors the embedding sees (``u = z + photo_noise * eps``, one
  draw per photo, then the map): the embedding determines ``u``, so the true conditional of a
  LoRA given its embedding is known in closed form (Gaussian posterior of ``z`` given ``u``,
  prior for the hidden factors) and the world's oracle samples it exactly.

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

from lorasynth.core.layout import W2W_TARGETS, Layout
from lorasynth.core.lora import LoRA, canonical_factors

#: The miniature SD1.5 UNet (``lorasynth.worlds.tiny_sd``, size "tiny") cross-attention blocks a
#: to_q/to_v LoRA touches: width 32, text-context width 32.
TINY_BLOCKS = ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
TINY_WIDTH = 32
TINY_CONTEXT = 32


#: Every attention projection (the "all attention" module set of the world panel).
ATTENTION_TARGETS = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))


def tiny_layout(rank: int = 1, targets: tuple[str, ...] = W2W_TARGETS) -> Layout:
    """The w2w-style layout for the tiny test UNet: 3 blocks x to_q/to_v of attn1/attn2
    (``targets``: another module set, e.g. :data:`ATTENTION_TARGETS`).

    12 modules of 32x32, rank 1 by default: ``D = 768``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for block in TINY_BLOCKS:
        for target in targets:
            in_features = TINY_CONTEXT if target in ("attn2.to_k", "attn2.to_v") else TINY_WIDTH
            shapes[f"unet.{block}.transformer_blocks.0.{target}"] = (TINY_WIDTH, in_features)
    return Layout.for_targets(shapes, targets, rank=rank)


@dataclass
class SyntheticWorldConfig:
    """Size and difficulty of a planted world.

    Attributes:
        n_identities: number of identities ``N``.
        layout: the LoRA layout of every identity (:func:`tiny_layout`, ``Layout.w2w()``...).
        n_factors: hidden factors per identity (the manifold dimension).
        embed_dim: face-embedding size (ArcFace is 512, dlib 128).
        embed_noise: norm of the noise added to the unit signal embedding (before the final
            normalisation): how much an embedding tells about its identity. With it the
            oracle knows more than the embedding shows (an upper bound, not exact).
        photo_noise: std of the per-photo noise on the visible factors before the embedding
            map (in units of their prior std); with ``embed_noise = 0`` the oracle is exact.
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
        hidden_factors: identity factors the face embedding does NOT see (0 = the original
            easy world, where the embedding sees every factor). With hidden factors every
            module's code is ``sqrt(f) * g(z_visible) + sqrt(1 - f) * h(z_hidden)`` (two
            independent tanh MLPs, each scaled to unit variance), ``f = visible_fraction``.
        visible_fraction: the share of the code variance the embedding can see (0.3, 0.6, 0.95
            in the quality grid); only used with ``hidden_factors > 0``.
        loras_per_person: LoRAs per person (identity): rows ``p*m .. p*m+m-1`` belong to
            person ``p`` (``n_identities`` persons, ``n_identities * m`` rows); each row has its
            own LoRA noise and its own face embedding (another photo).
    """

    n_identities: int
    layout: Layout
    n_factors: int = 8
    embed_dim: int = 128
    embed_noise: float = 0.05
    photo_noise: float = 0.0
    seed: int = 0
    hidden: int = 64
    codes_per_module: int = 4
    gain: float = 1.5
    mean_strength: float = 0.3
    up_variation: float = 0.6
    spike: float = 1.0
    lora_noise: float = 0.02
    delta_norm: float = 0.5
    hidden_factors: int = 0
    visible_fraction: float = 1.0
    loras_per_person: int = 1
    bounded: bool = True  # False: the factor maps' activation is unbounded (x (1 + 0.3 |x|)) instead of tanh

    def __post_init__(self) -> None:
        if not 0.0 < self.visible_fraction <= 1.0:
            raise ValueError(f"visible_fraction must be in (0, 1], got {self.visible_fraction}")
        if self.loras_per_person < 1 or self.hidden_factors < 0 or self.n_identities < 1:
            raise ValueError("n_identities and loras_per_person must be >= 1, hidden_factors >= 0")
        if self.photo_noise < 0 or self.embed_noise < 0:
            raise ValueError("photo_noise and embed_noise must be >= 0")

    @property
    def exact_oracle(self) -> bool:
        """True when the embedding is a function of what the oracle conditions on (no embedding-space noise)."""
        return self.embed_noise == 0

    @property
    def hard(self) -> bool:
        """A world with hidden factors or several LoRAs per person (the quality grid's kind)."""
        return self.hidden_factors > 0 or self.loras_per_person > 1


def activation(bounded: bool):
    """The factor maps' nonlinearity: ``tanh`` (bounded), or ``x (1 + 0.3 |x|)`` (unbounded, monotone)."""
    return np.tanh if bounded else (lambda x: x * (1 + 0.3 * np.abs(x)))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# stream tags, so that the draws of different quantities never share a random stream
_MAPS, _FACTORS, _EMBED, _NOISE, _HIDDEN, _ORACLE = 1, 2, 3, 4, 5, 6


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
    """A planted world: hidden factors, embeddings, and LoRA vectors made on demand.

    ``factors`` are the per-person factors the embedding sees, ``hidden`` the ones it does
    not (``(P, 0)`` in the easy world); ``person[i]`` is row ``i``'s person.
    """

    config: SyntheticWorldConfig
    factors: np.ndarray  # (P, k) float64: visible factors per person
    embeddings: np.ndarray  # (N, E) float32, unit norm, one per row
    _w1: np.ndarray = field(repr=False)
    _b1: np.ndarray = field(repr=False)
    _w2: np.ndarray = field(repr=False)
    _b2: np.ndarray = field(repr=False)
    _modules: list[_ModuleMaps] = field(repr=False)
    hidden: np.ndarray | None = None  # (P, h) float64: hidden factors per person
    seen: np.ndarray | None = None  # (N, k) float64: the factors each row's photo shows (factors + photo noise)
    _hidden_maps: tuple | None = field(default=None, repr=False)  # (w1, b1, w2, b2) of h(z_hidden)
    _code_stats: tuple | None = field(default=None, repr=False)  # (mu_v, sd_v, mu_h, sd_h, typical sd)

    @property
    def layout(self) -> Layout:
        return self.config.layout

    @property
    def n(self) -> int:
        """Number of rows (LoRAs): persons x LoRAs per person."""
        return self.config.n_identities * self.config.loras_per_person

    @property
    def n_persons(self) -> int:
        return self.config.n_identities

    @property
    def person(self) -> np.ndarray:
        """Person index of every row ``(N,)`` int64."""
        return np.arange(self.n, dtype=np.int64) // self.config.loras_per_person

    @property
    def dim(self) -> int:
        return self.layout.size

    def __len__(self) -> int:
        return self.n

    def ids(self, idx: Sequence[int] | None = None) -> list[str]:
        """Stable entry ids for rows ``idx`` (all by default): ``id00042``, or ``id00042~1`` (the
        person's second LoRA) with several LoRAs per person (see :func:`lorasynth.library.splits.person_key`)."""
        idx = range(self.n) if idx is None else idx
        m = self.config.loras_per_person
        width = max(5, len(str(self.n_persons - 1)))
        if m == 1:
            return [f"id{int(i):0{width}d}" for i in idx]
        return [f"id{int(i) // m:0{width}d}~{int(i) % m}" for i in idx]

    # ---------------------------------------------------------------- rows
    def _visible_codes(self, z: np.ndarray) -> np.ndarray:
        act = activation(self.config.bounded)
        h = act(z @ self._w1 + self._b1)
        return act(h @ self._w2 + self._b2)

    def _codes_from(self, z_vis: np.ndarray, z_hid: np.ndarray | None) -> np.ndarray:
        """Per-module codes ``(n, M, q)`` from visible (and hidden) factors."""
        c = self._visible_codes(z_vis)
        if self._hidden_maps is not None and z_hid is not None:
            w1, b1, w2, b2 = self._hidden_maps
            mu_v, sd_v, mu_h, sd_h, typical = self._code_stats
            f = self.config.visible_fraction
            act = activation(self.config.bounded)
            ch = act(act(z_hid @ w1 + b1) @ w2 + b2)
            c = mu_v + typical * (math.sqrt(f) * (c - mu_v) / sd_v + math.sqrt(1 - f) * (ch - mu_h) / sd_h)
        return c.reshape(len(c), len(self._modules), self.config.codes_per_module)

    def codes(self, idx: Sequence[int]) -> np.ndarray:
        """Per-module codes ``(n, M, q)`` of rows ``idx`` (the nonlinear part)."""
        p = self.person[np.asarray(idx, dtype=np.int64)]
        return self._codes_from(self.factors[p], None if self.hidden is None else self.hidden[p])

    def _check(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row index out of range 0..{self.n - 1}")
        return idx

    def vectors(self, idx: Sequence[int]) -> np.ndarray:
        """Raw (unstandardised) canonical LoRA vectors ``(len(idx), D)`` float32."""
        idx = self._check(idx)
        noise = np.empty((len(idx), self.dim), dtype=np.float32)
        for row, i in enumerate(idx):
            noise[row] = _rng(self.config.seed, _NOISE, i).standard_normal(self.dim, dtype=np.float32)
        return self._assemble(self.codes(idx), noise)

    def oracle_vectors(self, idx: Sequence[int], n_samples: int, seed: int = 0) -> np.ndarray:
        """Exact samples of the true conditional distribution of rows ``idx`` given what their
        embeddings see: ``(len(idx), n_samples, D)`` float32.

        Each sample draws the visible factors from their posterior given what the row's photo shows
        (``z | u ~ N(u / (1 + s^2), s^2 / (1 + s^2))`` with ``s = photo_noise``; the factors
        themselves without photo noise), the hidden factors and the LoRA noise afresh from their
        priors: the ideal "one sample" a hypernetwork could give, whose average over many samples
        is the best possible point prediction and whose pairwise spread is the spread a
        calibrated sampler should show. Exact when ``embed_noise == 0`` (the embedding is a
        function of ``u``); with embedding-space noise it knows more than the embedding shows
        (an upper bound).
        """
        idx = self._check(idx)
        cfg, h = self.config, 0 if self.hidden is None else self.hidden.shape[1]
        out = np.empty((len(idx), n_samples, self.dim), dtype=np.float32)
        p = self.person[idx]
        s2 = cfg.photo_noise**2
        for row, i in enumerate(idx):
            rng = _rng(cfg.seed, _ORACLE, seed, i)
            if s2 > 0:
                z_vis = self.seen[i] / (1 + s2) + math.sqrt(s2 / (1 + s2)) * rng.standard_normal((n_samples, self.seen.shape[1]))
            else:
                z_vis = np.repeat(self.factors[p[row]][None], n_samples, axis=0)
            z_hid = rng.standard_normal((n_samples, h)) if h else None
            noise = rng.standard_normal((n_samples, self.dim), dtype=np.float32)
            out[row] = self._assemble(self._codes_from(z_vis, z_hid), noise)
        return out

    def _assemble(self, codes: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Codes ``(n, M, q)`` and unit noise ``(n, D)`` -> canonical vectors ``(n, D)`` float32."""
        n = len(codes)
        out = np.empty((n, self.dim), dtype=np.float32)
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
            out[:, pos : pos + nd] = a.reshape(n, nd).numpy()
            out[:, pos + nd : pos + nd + nu] = b.reshape(n, nu).numpy()
            pos += nd + nu
        return out

    def vector(self, i: int) -> np.ndarray:
        """Raw canonical LoRA vector ``(D,)`` float32 of row ``i``."""
        return self.vectors([i])[0]

    def lora(self, i: int) -> LoRA:
        """Row ``i`` as a LoRA (alpha = rank, scale 1)."""
        return self.layout.unflatten(torch.from_numpy(self.vector(i)))

    def iter_batches(self, idx: Sequence[int] | None = None, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """``(vectors, embeddings, ids)`` batches over ``idx`` (all rows by default)."""
        idx = np.arange(self.n) if idx is None else np.asarray(idx, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            yield self.vectors(part), self.embeddings[part], self.ids(part)


def _canonical_batch(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched canonical form (:func:`lorasynth.core.lora.canonical_factors`) of ``delta W = up @ down``."""
    return canonical_factors(up, down)


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
    world = SyntheticWorld(cfg, factors, np.zeros((0, cfg.embed_dim), np.float32), w1, b1, w2, b2, modules)
    if cfg.hidden_factors > 0:
        h = cfg.hidden_factors
        hr = _rng(cfg.seed, _HIDDEN)
        hw1 = hr.standard_normal((h, cfg.hidden)) * cfg.gain / math.sqrt(h)
        hb1 = hr.standard_normal(cfg.hidden) * 0.5
        hw2 = hr.standard_normal((cfg.hidden, len(layout) * q)) * cfg.gain / math.sqrt(cfg.hidden)
        hb2 = hr.standard_normal(len(layout) * q) * 0.3
        world._hidden_maps = (hw1, hb1, hw2, hb2)
        ref = _rng(cfg.seed, _HIDDEN, 1)  # fixed code statistics, independent of N
        cv = world._visible_codes(ref.standard_normal((4096, k)))
        act = activation(cfg.bounded)
        ch = act(act(ref.standard_normal((4096, h)) @ hw1 + hb1) @ hw2 + hb2)
        sd_v, sd_h = cv.std(0) + 1e-6, ch.std(0) + 1e-6
        world._code_stats = (cv.mean(0), sd_v, ch.mean(0), sd_h, float(sd_v.mean()))
        world.hidden = _rng(cfg.seed, _HIDDEN, 2).standard_normal((cfg.n_identities, h))
    world.seen = np.repeat(factors, cfg.loras_per_person, axis=0)
    if cfg.photo_noise > 0:  # one photo per row: its own view of the person's factors
        world.seen = world.seen + cfg.photo_noise * _rng(cfg.seed, _EMBED, 3).standard_normal(world.seen.shape)
    world.embeddings = _embed(world.seen, cfg)
    return world


def _embed(seen: np.ndarray, cfg: SyntheticWorldConfig) -> np.ndarray:
    """Seen factors (one row per photo) -> unit embeddings through a different random tanh MLP, plus noise."""
    rng = _rng(cfg.seed, _EMBED)
    k, hidden, e = seen.shape[1], 2 * cfg.hidden, cfg.embed_dim
    v1 = rng.standard_normal((k, hidden)) * cfg.gain / math.sqrt(k)
    c1 = rng.standard_normal(hidden) * 0.5
    v2 = rng.standard_normal((hidden, e)) / math.sqrt(hidden)
    reference = _rng(cfg.seed, _EMBED, 2).standard_normal((4096, k))  # fixed centring, independent of N
    signal = np.tanh(seen @ v1 + c1) @ v2
    signal -= (np.tanh(reference @ v1 + c1) @ v2).mean(axis=0, keepdims=True)
    signal /= np.linalg.norm(signal, axis=1, keepdims=True) + 1e-12
    noise = _rng(cfg.seed, _EMBED, 1).standard_normal(signal.shape) * cfg.embed_noise / math.sqrt(e)
    emb = signal + noise
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


# train_test_split moved to lorasynth.library.splits (splits belong to evaluation, not to the world);
# re-exported here for old callers.
from lorasynth.library.splits import train_test_split  # noqa: E402,F401




def write_world_pack(world: SyntheticWorld, out_dir: str | Path, idx: Sequence[int] | None = None,
                     batch_size: int = 128, overwrite: bool = False) -> Path:
    """Write identities ``idx`` (all by default) of ``world`` as a pack (see :mod:`lorasynth.library.pack`)."""
    from lorasynth.library.pack import PackWriter

    idx = np.arange(world.n) if idx is None else np.asarray(idx, dtype=np.int64)
    with PackWriter(out_dir, world.layout, len(idx), world.config.embed_dim, embedder="synthetic",
                    overwrite=overwrite) as writer:
        for vectors, embeddings, ids in world.iter_batches(idx, batch_size):
            writer.add_batch(vectors, embeddings, ids)
    return Path(out_dir)


# --------------------------------------------------------------------------- the quality grid


def hard_world_config(n_identities: int, layout: Layout | str = "tiny", visible_fraction: float = 0.6,
                      loras_per_person: int = 2, photo_noise: float = 0.3, embed_noise: float = 0.0, gain: float = 1.5,
                      hidden_factors: int = 8, lora_noise: float = 0.1, embed_dim: int = 128,
                      seed: int = 0) -> SyntheticWorldConfig:
    """A hard world: the embedding sees ``visible_fraction`` of each LoRA's code variance.

    ``layout``: a :class:`Layout`, ``"tiny"`` or ``"w2w"``. ``gain`` sets the nonlinearity of
    the maps (tanh pre-activation scale), ``photo_noise`` the photo-to-photo noise on the factors
    the embedding sees (the oracle stays exact), ``embed_noise`` extra noise on the embedding
    itself (then the oracle is only an upper bound), ``lora_noise`` the run-to-run noise of a
    person's LoRAs.
    """
    if isinstance(layout, str):
        layout = {"tiny": tiny_layout, "w2w": Layout.w2w}[layout]()
    return SyntheticWorldConfig(n_identities, layout, embed_dim=embed_dim, embed_noise=embed_noise,
                                photo_noise=photo_noise, seed=seed,
                                gain=gain, lora_noise=lora_noise, hidden_factors=hidden_factors,
                                visible_fraction=visible_fraction, loras_per_person=loras_per_person)


#: The worlds ``scripts/bench_quality.py`` reports on (name -> :func:`hard_world_config` keywords).
QUALITY_GRID: dict[str, dict] = {
    "tiny-vis30": dict(layout="tiny", visible_fraction=0.3),
    "tiny-vis60": dict(layout="tiny", visible_fraction=0.6),
    "tiny-vis95": dict(layout="tiny", visible_fraction=0.95),
    "tiny-vis60-curved": dict(layout="tiny", visible_fraction=0.6, gain=2.5, photo_noise=0.5),
    "w2w-vis60": dict(layout="w2w", visible_fraction=0.6),
}
