"""A panel of planted worlds with randomized structure, and each world's best reference.

One planted world is one set of design choices; a method tuned on it can fit that world alone.
:func:`random_spec` draws a world's *structure* from a seed: LoRAs per identity (1-3), rank (1-8),
module set (w2w's to_q/to_v, or every attention projection), the strength of the shared mean
direction, bounded (tanh) or unbounded factor maps and their curvature, noise on the photo (the
oracle stays exact) or on the embedding itself (no exact oracle), the fraction of each LoRA's
code variance the embedding sees (0.2-0.95) and the number of identities (500-20,000).

Two panels are fixed in ``panels.json`` (next to this file), drawn once before any tuning: the
**validation panel** (design choices are made on it) and the **held-out panel** (other seeds and
structures, only reported). ``scripts/bench_quality.py --panel validation|heldout`` runs them.

Each world carries the best reference it can (:func:`reference_scores`): the exact oracle where
the embedding adds no noise of its own, else a closed-form kernel ridge regression of ΔW on the
embedding (written here, independently of the model's code) and ``(its mean cosine)^2`` as the
one-sample reference (one draw from the ideal conditional scores about the square of the ideal
mean's cosine).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lorasynth.core.delta import delta_gram, delta_inner
from lorasynth.core.layout import W2W_TARGETS, Layout
from lorasynth.worlds.planted import ATTENTION_TARGETS, SyntheticWorld, SyntheticWorldConfig, tiny_layout

PANELS_FILE = Path(__file__).with_name("panels.json")


@dataclass(frozen=True)
class WorldSpec:
    """The structure of one panel world (JSON-able; see :func:`random_spec`)."""

    name: str
    seed: int
    n_identities: int
    loras_per_person: int
    rank: int
    modules: str  # "w2w" (to_q/to_v of attn1/attn2) or "attention" (every attention projection)
    layout: str  # "tiny" or "w2w" (the real SD1.5 w2w layout, 99,648 values at rank 1)
    mean_strength: float
    bounded: bool
    gain: float
    noise: str  # "photo" (exact oracle) or "embedding" (reference: kernel ridge)
    noise_level: float
    visible_fraction: float

    def config(self, n_identities: int | None = None) -> SyntheticWorldConfig:
        """The world's :class:`SyntheticWorldConfig` (``n_identities`` overrides the size: a quick run)."""
        if self.layout == "w2w":
            if self.rank != 1 or self.modules != "w2w":
                raise ValueError("the w2w layout is rank 1, to_q/to_v")
            layout = Layout.w2w()
        else:
            layout = tiny_layout(self.rank, W2W_TARGETS if self.modules == "w2w" else ATTENTION_TARGETS)
        photo = self.noise == "photo"
        return SyntheticWorldConfig(
            int(n_identities or self.n_identities), layout, seed=self.seed, hidden_factors=8,
            visible_fraction=self.visible_fraction, loras_per_person=self.loras_per_person,
            photo_noise=self.noise_level if photo else 0.0, embed_noise=0.0 if photo else self.noise_level,
            mean_strength=self.mean_strength, gain=self.gain, bounded=self.bounded, lora_noise=0.1)

    def to_dict(self) -> dict:
        return asdict(self)


def random_spec(seed: int, name: str | None = None, layout: str = "tiny", max_identities: int = 20000) -> WorldSpec:
    """A world structure drawn from ``seed`` (see module docstring); the same seed, the same spec."""
    rng = np.random.default_rng([22, int(seed)])
    noise = "embedding" if rng.random() < 0.5 else "photo"
    log_n = rng.uniform(math.log(500), math.log(min(max_identities, 20000)))
    return WorldSpec(
        name=name or f"world-{seed}", seed=int(seed), n_identities=int(round(math.exp(log_n), -1)),
        loras_per_person=int(rng.integers(1, 4)), rank=int(rng.choice([1, 1, 2, 4, 8])),
        modules="w2w" if rng.random() < 0.6 else "attention", layout=layout,
        mean_strength=float(round(math.exp(rng.uniform(math.log(0.2), math.log(4.0))), 2)),
        bounded=bool(rng.random() < 0.6), gain=float(round(rng.uniform(1.0, 2.5), 2)), noise=noise,
        noise_level=float(round(rng.uniform(0.1, 0.6), 2)),
        visible_fraction=float(round(rng.uniform(0.2, 0.95), 2)))


def make_panels(validation_seeds=range(100, 106), heldout_seeds=range(200, 206)) -> dict:
    """The two panels as written to ``panels.json`` (the w2w-layout world of each is the issue's kind:
    one LoRA per identity, strong shared mean, bounded maps, embedding noise)."""
    val = [random_spec(s, f"val-{s}") for s in validation_seeds]
    held = [random_spec(s, f"heldout-{s}") for s in heldout_seeds]
    issue_kind = dict(n_identities=2000, loras_per_person=1, rank=1, modules="w2w", layout="w2w", mean_strength=3.0,
                      bounded=True, gain=1.5, noise="embedding", noise_level=0.5, visible_fraction=0.6)
    val.append(WorldSpec(name="val-issue-w2w", seed=150, **issue_kind))
    held.append(WorldSpec(name="heldout-issue-w2w", seed=250, **{**issue_kind, "visible_fraction": 0.8}))
    return {"about": "fixed before any tuning (lorasynth.worlds.panel.make_panels); tune on validation only",
            "validation": [w.to_dict() for w in val], "heldout": [w.to_dict() for w in held]}


def load_panel(which: str) -> list[WorldSpec]:
    """The ``"validation"`` or ``"heldout"`` panel recorded in ``panels.json``."""
    from lorasynth.core.safe_io import read_json

    if which not in ("validation", "heldout"):
        raise ValueError(f"panel must be 'validation' or 'heldout', got {which!r}")
    return [WorldSpec(**w) for w in read_json(PANELS_FILE, "world panels")[which]]


# --------------------------------------------------------------------------- references


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def kernel_ridge_delta(world: SyntheticWorld, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                       max_train: int = 2000, seed: int = 0) -> dict:
    """Kernel ridge regression of ΔW on the embedding, in closed form (RBF kernel on unit embeddings,
    ``(gamma, ridge)`` chosen on the ``val`` rows by mean ΔW cosine): the prediction for a face is
    ``sum_j w_j(face) ΔW_j`` over (at most ``max_train``) training rows, scored through ΔW Grams.
    Returns the mean ΔW cosine on ``test`` and the chosen setting."""
    rng = np.random.default_rng(seed)
    train = np.sort(rng.permutation(np.asarray(train))[:max_train])
    layout = world.layout
    xt = world.vectors(train)
    e = _unit(world.embeddings[train].astype(np.float64))
    g_tt = delta_gram(layout, xt, xt)

    def table(rows):
        x = world.vectors(rows)
        return _unit(world.embeddings[rows].astype(np.float64)), delta_gram(layout, xt, x), \
            delta_inner(layout, torch.from_numpy(x).double(), torch.from_numpy(x).double()).numpy()

    d2 = ((e[:, None] - e[None]) ** 2).sum(-1)
    med = float(np.median(d2[np.triu_indices(len(e), 1)]))
    val_t, test_t = table(np.asarray(val)), table(np.asarray(test))

    def cos(weights, t):
        _, g_tx, tt = t
        pt = (weights * g_tx.T).sum(1)
        pp = np.einsum("bi,ij,bj->b", weights, g_tt, weights)
        return pt / np.sqrt(np.maximum(pp * tt, 1e-300))

    best = None
    for gm in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        k = np.exp(-gm / med * d2)
        lam, vec = np.linalg.eigh(k)
        for ridge in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
            inv = (vec / (lam + ridge * len(e))) @ vec.T

            def weights(t, inv=inv, gm=gm):
                ev = t[0]
                kx = np.exp(-gm / med * ((ev[:, None] - e[None]) ** 2).sum(-1))
                return kx @ inv

            score = float(cos(weights(val_t), val_t).mean())
            if best is None or score > best[0]:
                best = (score, gm, ridge, weights)
    score, gm, ridge, weights = best
    test_cos = cos(weights(test_t), test_t)
    return {"delta_cosine_mean": float(test_cos.mean()), "gamma_over_median": gm, "ridge": ridge,
            "validation_delta_cosine": score, "train_rows_used": int(len(train))}


def reference_scores(world: SyntheticWorld, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                     oracle_samples: int = 16) -> dict:
    """The best reference the world has for one sample and for a point estimate on ``test`` rows:
    the exact oracle (photo noise only), else the kernel ridge in ΔW space and its squared cosine."""
    from lorasynth.synthesis.evaluation import sample_scores

    ridge = kernel_ridge_delta(world, train, val, test)
    out = {"kernel_ridge_delta": ridge}
    if world.config.exact_oracle:
        o = sample_scores(world.layout, world.oracle_vectors(test, oracle_samples).astype(np.float64),
                          world.vectors(test).astype(np.float64))
        out.update(kind="exact oracle", one_sample=o["one_sample"], point=o["mean_of_n"], oracle=o)
    else:
        c = ridge["delta_cosine_mean"]
        out.update(kind="kernel ridge (closed form) and its squared cosine", one_sample=c * c, point=c)
    return out
