"""The model's expected delta W of a face (``synthesize --average``), exact in factor space.

Every module's update is ``dW = B(z) A(z)``, with ``B`` and ``A`` slices of the decoded vector. With
an affine decoder (PCA) both are affine in the latent ``z``; with ``z ~ (mu, C)`` and ``C = R R^T``

    E[dW] = B(mu) A(mu) + sum_l B1(R_l) A1(R_l)          (B1, A1: the linear parts of B, A)

exactly: one decode of the mean and one linear decode per root column (``m + 1`` decodes, where
the sigma-point route decodes ``2m`` LoRAs and truncates a rank-``2m`` stack per module).

The residual covariance is ``shrink * global + (1 - shrink) * local(face)``
(:class:`~lorasynth.models.hypernet.regression.LocalCovariance`). The global part is the same for
every face, so its term ``T = sum_l B1(G_l) A1(G_l)`` is computed once per model: the root ``G`` from
the covariance's eigendecomposition (cached on the hypernetwork), then the top ``lead`` singular
triplets of ``T`` per module (the energy of the rest, ``tail``, is recorded). Per face only
``B(mu) A(mu)`` and the ``k`` local roots change: the optimal rank-``r`` truncation of
``T_lead + F`` is exact in the factor stack ``[U_T S_T, F_B] [V_T, F_A]^T`` (a QR of each factor and
an SVD of a ``(lead + k + 1)``-square core per module, batched over modules of one shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorasynth.core.layout import Layout
from lorasynth.core.lora import LoRA, LoRAModule, factored_svd, factors_from_svd

#: Singular triplets of the global term kept per module (the rest's energy is recorded as ``tail``).
LEAD = 64
#: Fraction of the global covariance's variance the root keeps (as Hypernet.expected_latents).
KEEP = 0.9999
#: Randomized SVD of the global term: extra columns, power iterations; modules up to DENSE_MAX
#: weights (or narrower than lead + OVERSAMPLE) take an exact dense SVD instead.
OVERSAMPLE, POWER_ITERATIONS, DENSE_MAX = 16, 2, 65536
#: Singular values of the global term below this fraction of its largest count as zero.
ZERO_FLOOR = 1e-7


def orthonormal(y: torch.Tensor, rel_floor: float = 1e-10, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal columns spanning ``y`` (..., n, c), by the eigendecomposition of its Gram in float64
    (matrix products instead of a QR, which is slow on CPU for many tall matrices); directions
    whose squared weight is below ``rel_floor`` times ``ref`` (default: the largest) come out as
    zero columns. Same dtype as ``y``."""
    yd = y.double()
    val, vec = torch.linalg.eigh(yd.mT @ yd)
    ref = val[..., -1:] if ref is None else ref
    keep = val > rel_floor * ref.clamp_min(1e-300)
    inv = torch.where(keep, val.clamp_min(1e-300).rsqrt(), torch.zeros_like(val))
    q = yd @ (vec * inv[..., None, :])
    # one more pass restores orthogonality lost to rounding (the Gram squares the condition number)
    val2, vec2 = torch.linalg.eigh(q.mT @ q)
    keep2 = val2 > 0.5
    q = q @ (vec2 * torch.where(keep2, val2.clamp_min(1e-300).rsqrt(), torch.zeros_like(val2))[..., None, :])
    return q.to(y.dtype)


def truncate_update(u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor, fb: torch.Tensor, fa: torch.Tensor):
    """SVD of ``U diag(s) V^T + fb @ fa`` (batched), where ``U`` (``u``) and ``V`` (``vt``) have
    orthonormal (or zero) columns (the cached global term) and ``fb``, ``fa`` are a few new rank components: the new
    components' parts outside ``U`` (``V``) are orthonormalized, and a ``(lead + c)``-square core
    holds the whole update. Returns ``(U', S', Vh')`` as :func:`~lorasynth.core.lora.factored_svd`."""
    u, s, v = u.double(), s.double(), vt.double().mT
    fb, fa = fb.double(), fa.double().mT  # (G, out, c), (G, in, c)
    cb, ca = u.mT @ fb, v.mT @ fa  # coordinates in U, V
    pb, pa = fb - u @ cb, fa - v @ ca
    pb, pa = pb - u @ (u.mT @ pb), pa - v @ (v.mT @ pa)  # twice: U, V are orthonormal to float32 rounding
    # what is left of a new component below ~1e-5 of its size is rounding of the projection, not a direction
    eb = orthonormal(pb, 1e-10, fb.square().sum((-2, -1))[..., None])
    ea = orthonormal(pa, 1e-10, fa.square().sum((-2, -1))[..., None])
    qb, qa = torch.cat([u, eb], -1), torch.cat([v, ea], -1)
    rb = torch.cat([torch.cat([torch.diag_embed(s), cb], -1),
                    torch.cat([torch.zeros(*s.shape[:-1], eb.shape[-1], s.shape[-1], dtype=s.dtype), eb.mT @ fb], -1)], -2)
    ra = torch.cat([torch.cat([torch.diag_embed(torch.ones_like(s)), ca], -1),
                    torch.cat([torch.zeros(*s.shape[:-1], ea.shape[-1], s.shape[-1], dtype=s.dtype), ea.mT @ fa], -1)], -2)
    uc, sc, vhc = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return qb @ uc, sc, vhc @ qa.mT


def global_covariance_root(hypernet, keep: float = KEEP) -> torch.Tensor:
    """``G`` (K, m), raw latent units, float64: ``G G^T`` is the face-independent part of the residual
    covariance (``shrink * global``, or all of it without a local covariance) times the squared
    temperature; its ``m`` principal directions hold a fraction ``keep`` of the variance. The
    eigendecomposition is cached on the hypernetwork (recomputed if its statistics change)."""
    h = hypernet
    inputs = (h.resid_cov, h.resid_std, h.latent_std, h.spread_scale, h.cov_shrink, h.cov_resid)
    return h.cached(f"global_root:{keep!r}", inputs, lambda: _global_root(h, keep))


def _global_root(h, keep: float) -> torch.Tensor:
    k = h.config.latent_dim
    weight = float(h.cov_shrink) if h.local_covariance else 1.0
    empty = torch.zeros(k, 0, dtype=torch.float64, device=h.latent_mean.device)
    if weight <= 0:
        return empty
    std = h.latent_std.double()
    glob = h.resid_cov if h.local_covariance else torch.diag(h.resid_std.pow(2))
    cov = glob.double() * (std[:, None] * std[None, :]) * (weight * float(h.spread_scale.mean()) ** 2)
    val, vec = torch.linalg.eigh(cov)
    val, vec = val.clamp_min(0).flip(-1), vec.flip(-1)
    if float(val.sum()) <= 0:
        return empty
    m = min(int((val.cumsum(-1) / val.sum() < keep).sum()) + 1, k)
    return vec[:, :m] * val[:m].sqrt()


def local_covariance_roots(hypernet, cond: torch.Tensor) -> torch.Tensor | None:
    """``L`` (B, K, k), raw latent units, float64: ``L L^T`` is the face-dependent part of each raw
    condition's residual covariance (``(1 - shrink) sum_j w_j r_j r_j^T`` times the squared
    temperature); None when the model has none (or ``shrink`` is 1)."""
    h = hypernet
    if not h.local_covariance or float(h.cov_shrink) >= 1:
        return None
    from lorasynth.models.hypernet.regression import neighbour_weights

    w, idx = neighbour_weights(cond.float(), h.cov_cond, int(h.cov_k), float(h.cov_tau))
    r = h.cov_resid[idx].double() * w.double().sqrt().unsqueeze(-1)  # (B, k, K), standardized units
    scale = math.sqrt(1 - float(h.cov_shrink)) * float(h.spread_scale.mean())
    return (r * (h.latent_std.double() * scale)).transpose(1, 2)


def expected_mean(hypernet, cond: torch.Tensor) -> torch.Tensor:
    """The closed-form mean latent of each raw condition (B, K), raw units, float64."""
    h = hypernet
    return h.denormalize_latent(h.conditional_mean(h.normalize_cond(cond.float()))).double()


@dataclass
class _Group:
    """Modules of one factor shape, batched: the global term's top singular triplets."""

    names: list[str]
    offsets: list[int]
    down_tail: tuple[int, ...]  # the down factor's shape after the rank (in, or in, kh, kw)
    up_tail: tuple[int, ...]  # the up factor's shape after (out, rank): () or (1, 1)
    rank: int
    n_in: int
    n_out: int
    u: torch.Tensor  # (G, out, lead): U_T (orthonormal columns, or zero where S_T is zero)
    s: torch.Tensor  # (G, lead): S_T, float64
    vt: torch.Tensor  # (G, lead, in): V_T^T
    tail: torch.Tensor  # (G,) energy of T the lead triplets drop (float64)


@dataclass
class ExpectedReport:
    rank: int
    overall_error: float  # relative Frobenius error of the truncation (against T_lead + F)
    tail: float  # relative energy of the global term left out of the lead triplets
    module_errors: dict[str, float] = field(default_factory=dict)


class ExpectedDelta:
    """The expected delta W of faces under one model with a PCA latent (see the module docstring).

    Built once per :class:`~lorasynth.synthesis.synthesizer.Synthesizer`; the first call computes
    the per-model global term (seconds), later calls take milliseconds to a few tenths of a second.
    """

    def __init__(self, latent, hypernet, layout: Layout, lead: int = LEAD, keep: float = KEEP,
                 dtype: torch.dtype = torch.float32):
        self.latent, self.hypernet, self.layout = latent, hypernet, layout
        self.lead, self.keep, self.dtype = lead, keep, dtype
        self._groups: list[_Group] | None = None
        self._key = None

    # ------------------------------------------------------------------ decoding
    def decode_mean(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, K) -> flat LoRA vectors (B, D), float32 (the PCA decode + destandardize)."""
        lat = self.latent
        return lat.destandardize(lat.decode(mu.float()))

    def decode_linear(self, dirs: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The decoder's linear part on latent directions (n, K) -> (n, D[rows]), in ``self.dtype``."""
        lat = self.latent
        comp = lat.components[rows].to(self.dtype)
        return (dirs.to(self.dtype) @ comp.T) * lat.scale[rows].to(self.dtype)

    def _module_views(self, v: torch.Tensor, off: int, r: int, n_in: int, n_out: int):
        """``(B (n, out, r), A (n, r, in))`` of rows ``v`` (n, D) at a module's offset."""
        nd = r * n_in
        return v[:, off + nd: off + nd + n_out * r].reshape(-1, n_out, r), v[:, off: off + nd].reshape(-1, r, n_in)

    # ------------------------------------------------------------------ the per-model global term
    def _module_maps(self, off: int, r: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's linear maps of one module: ``(Pb (r, out, K), Pa (r, in, K))``, so that
        ``B1(z)[:, j] = Pb[j] @ z`` and ``A1(z)[j] = Pa[j] @ z``."""
        lat, nd = self.latent, r * n_in
        comp = lat.components.to(self.dtype)
        scale = lat.scale.to(self.dtype)[:, None]
        pa = (comp[off: off + nd] * scale[off: off + nd]).reshape(r, n_in, -1)
        rows = slice(off + nd, off + nd + n_out * r)
        pb = (comp[rows] * scale[rows]).reshape(n_out, r, -1).transpose(0, 1)
        return pb, pa

    def _global_svd(self, pb, pa, cov) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top singular triplets of ``T = sum_j Pb_j^T... = sum_j Pb[j] C Pa[j]^T`` (out x in):
        ``(U (out, l), S (l,), Vh (l, in), tail)``. Exact (dense SVD) for small modules, else a
        randomized range finder with power iterations (Halko et al.), all matrix products in the
        latent space (``C`` is K x K): ``tail`` is then the energy the oversampled triplets beyond
        ``lead`` hold (a lower bound of what is dropped)."""
        r, n_out, n_in = pb.shape[0], pb.shape[1], pa.shape[1]

        def t_mul(x):  # T @ x, x (in, n)
            return sum(pb[j] @ (cov @ (pa[j].T @ x)) for j in range(r))

        def tt_mul(y):  # T^T @ y, y (out, n)
            return sum(pa[j] @ (cov @ (pb[j].T @ y)) for j in range(r))

        width = self.lead + OVERSAMPLE
        if min(n_out, n_in) <= width or n_out * n_in <= DENSE_MAX:
            u, s, vh = torch.linalg.svd(t_mul(torch.eye(n_in, dtype=self.dtype)).double(), full_matrices=False)
            s2 = s.square()
            return u[:, :self.lead], s[:self.lead], vh[:self.lead], s2[self.lead:].sum()
        gen = torch.Generator().manual_seed(0)
        y = orthonormal(t_mul(torch.randn(n_in, width, generator=gen, dtype=self.dtype)))
        for _ in range(POWER_ITERATIONS):
            y = orthonormal(t_mul(orthonormal(tt_mul(y))))
        small = tt_mul(y).T.double()  # (width, in) = Y^T T
        uc, s, vh = torch.linalg.svd(small, full_matrices=False)
        u = y.double() @ uc
        return u[:, :self.lead], s[:self.lead], vh[:self.lead], s[self.lead:].square().sum()

    def groups(self) -> list[_Group]:
        """The global term's top ``lead`` triplets per module (computed once, then cached)."""
        root = global_covariance_root(self.hypernet, self.keep)
        if self._groups is not None and self._key is root:
            return self._groups
        cov = (root @ root.T).to(self.dtype)
        shapes: dict[tuple, list[tuple[str, int]]] = {}
        offsets = self.layout.offsets
        for spec in self.layout.modules:
            shapes.setdefault((spec.down_shape, spec.up_shape), []).append((spec.name, offsets[spec.name]))
        groups = []
        for (down_shape, up_shape), items in shapes.items():
            r, n_in, n_out = down_shape[0], math.prod(down_shape[1:]), up_shape[0]
            us, ss, vt, tail = [], [], [], []
            for _, off in items:
                if root.shape[1] == 0:
                    u, s, vh, t = (torch.zeros(n_out, 0), torch.zeros(0), torch.zeros(0, n_in), torch.zeros(()))
                else:
                    u, s, vh, t = self._global_svd(*self._module_maps(off, r, n_in, n_out), cov)
                # directions without weight (T's rank is at most r * K) have arbitrary singular
                # vectors: zero them so the cached U and V stay orthonormal where they are used
                live = s.double() > ZERO_FLOOR * s.double().max().clamp_min(1e-300)
                t = t.double() + s.double()[~live].square().sum()
                us.append((u * live).to(self.dtype))
                ss.append(s.double() * live)
                vt.append((vh * live[:, None]).to(self.dtype))
                tail.append(t)
            lead = min(x.shape[-1] for x in us)
            groups.append(_Group([n for n, _ in items], [o for _, o in items], tuple(down_shape[1:]),
                                 tuple(up_shape[2:]), r, n_in, n_out, torch.stack([x[:, :lead] for x in us]),
                                 torch.stack([x[:lead] for x in ss]), torch.stack([x[:lead] for x in vt]),
                                 torch.stack(tail)))
        self._groups, self._key = groups, root
        return groups

    # ------------------------------------------------------------------ per face
    def face_factors(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x_mu (D,), local (k, D) or None)``: the decoded mean and the linear decodes of the local roots."""
        cond = torch.atleast_2d(torch.as_tensor(cond, dtype=torch.float32))
        mu = expected_mean(self.hypernet, cond)
        x_mu = self.decode_mean(mu)[0].to(self.dtype)
        loc = local_covariance_roots(self.hypernet, cond)
        return x_mu, None if loc is None else self.decode_linear(loc[0].T)

    def exact_factors(self, cond: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module ``(B, A)`` with ``B @ A`` = the expected delta W, untruncated (``m + 1 + k`` rank
        components, float64): the reference the truncated LoRA is checked against."""
        root = global_covariance_root(self.hypernet, self.keep)
        x_mu, loc = self.face_factors(cond)
        parts = [x_mu[None].double()] + ([] if loc is None else [loc.double()])
        if root.shape[1]:
            parts.append(self.decode_linear(root.T).double())
        v = torch.cat(parts)
        out = {}
        for spec, off in zip(self.layout.modules, self.layout.offsets.values()):
            r, n_in, n_out = spec.rank, math.prod(spec.down_shape[1:]), spec.up_shape[0]
            b, a = self._module_views(v, off, r, n_in, n_out)
            out[spec.name] = (b.permute(1, 0, 2).reshape(n_out, -1), a.reshape(-1, n_in))
        return out

    def lora(self, cond: torch.Tensor, rank: int) -> tuple[LoRA, ExpectedReport]:
        """One face's expected delta W as a rank-``rank`` LoRA (optimal truncation of ``T_lead + F``)."""
        groups = self.groups()
        x_mu, loc = self.face_factors(cond)
        v = x_mu[None] if loc is None else torch.cat([x_mu[None], loc])
        cap = max(min(g.n_out, g.n_in, g.u.shape[-1] + g.rank * len(v)) for g in groups)
        rank = min(rank, cap)
        modules, errors = {}, {}
        discarded = total = tail = tail_total = 0.0
        for g in groups:
            fb, fa = [], []
            for off in g.offsets:
                b, a = self._module_views(v, off, g.rank, g.n_in, g.n_out)  # (1+k, out, r), (1+k, r, in)
                fb.append(b.permute(1, 0, 2).reshape(g.n_out, -1))
                fa.append(a.reshape(-1, g.n_in))
            u, s, vh = truncate_update(g.u, g.s, g.vt, torch.stack(fb), torch.stack(fa))
            s2 = s.double().square()
            totals = s2.sum(-1) + g.tail
            kept = s2[:, :rank].sum(-1)
            for i, name in enumerate(g.names):
                lost = max(float(totals[i] - kept[i]), 0.0)
                errors[name] = math.sqrt(lost / float(totals[i])) if float(totals[i]) > 0 else 0.0
                b2, a2 = factors_from_svd(u[i], s[i], vh[i], rank)
                modules[name] = LoRAModule(a2.reshape(rank, *g.down_tail).float().contiguous(),
                                           b2.reshape(g.n_out, rank, *g.up_tail).float().contiguous(), rank)
            discarded += float((totals - kept).clamp_min(0).sum())
            total += float(totals.sum())
            tail += float(g.tail.sum())
            tail_total += float(totals.sum())
        lora = LoRA({n: modules[n] for n in self.layout.names})
        report = ExpectedReport(rank, math.sqrt(discarded / total) if total > 0 else 0.0,
                                tail / tail_total if tail_total > 0 else 0.0, errors)
        return lora, report
