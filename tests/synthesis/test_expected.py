"""The expected delta W in factor space (``synthesize --average`` with a PCA latent) against the
sigma-point construction it replaces: the same expected delta W, and the same rank truncation.

A random hypernetwork with a local covariance (shrink 0.4: global and face-dependent parts) and a
random PCA on a layout with small modules (exact SVDs) and two 320 x 320 ones (the randomized
range finder of the global term, ranks 1 and 2), built in milliseconds."""

import pytest
import torch

from lorasynth.core.blending import blend
from lorasynth.core.layout import Layout, ModuleSpec
from lorasynth.models.hypernet.model import Hypernet, HypernetConfig
from lorasynth.models.latent.pca import PCA
from lorasynth.synthesis.expected import ExpectedDelta, orthonormal, truncate_update

K, C = 24, 16


def _layout() -> Layout:
    return Layout((
        ModuleSpec("unet.a.to_q", (1, 40), (48, 1)),
        ModuleSpec("unet.b.to_v", (2, 40), (24, 2)),
        ModuleSpec("unet.c.to_q", (1, 320), (320, 1)),
        ModuleSpec("unet.d.to_q", (2, 320), (320, 2)),
    ))


def _pca(layout: Layout, gen) -> PCA:
    d = layout.size
    comp, _ = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))
    sv = torch.logspace(1, -1, K, dtype=torch.float64)
    return PCA(components=comp.float(), center=0.1 * torch.randn(d, generator=gen), singular_values=sv.float(),
               coef_mean=torch.zeros(K), coef_std=(sv / 10).float(), mean=0.01 * torch.randn(d, generator=gen),
               scale=(0.05 + torch.rand(d, generator=gen)) * 0.1, layout_signature=layout.signature, n_fit=100)


def _hypernet(gen, shrink: float) -> Hypernet:
    h = Hypernet(HypernetConfig(latent_dim=K, cond_dim=C, width=16, emb_dim=16))
    a = torch.randn(K, K, generator=gen)
    n = 50
    h.latent_mean.copy_(torch.randn(K, generator=gen))
    h.latent_std.copy_(torch.logspace(0.5, -1, K))
    h.resid_cov.copy_(a @ a.T / K + 0.05 * torch.eye(K))
    h.landmarks = torch.nn.functional.normalize(torch.randn(10, C, generator=gen), dim=1)
    h.coef = torch.randn(10, K, generator=gen)
    h.gamma.fill_(0.5)
    h.cov_cond = torch.nn.functional.normalize(torch.randn(n, C, generator=gen), dim=1)
    h.cov_resid = torch.randn(n, K, generator=gen)
    h.cov_k.fill_(6)
    h.cov_tau.fill_(0.1)
    h.cov_shrink.fill_(shrink)
    h.spread_scale.fill_(0.8)
    return h.eval()


@pytest.fixture(scope="module", params=[0.4, 1.0], ids=["local+global", "global"])
def parts(request):
    gen = torch.Generator().manual_seed(0)
    layout = _layout()
    return layout, _pca(layout, gen), _hypernet(gen, request.param), torch.randn(1, C, generator=gen)


def _sigma_point_deltas(layout, pca, h, cond, keep):
    """The construction `_expected` used before: 2m sigma points, decoded, their mean delta W."""
    z = h.expected_latents(cond, keep=keep)
    vecs = pca.destandardize(pca.decode(z)).double()
    loras = [layout.unflatten(v) for v in vecs]
    return loras, {name: sum(lo.modules[name].delta(torch.float64) for lo in loras) / len(loras) for name in layout.names}


def test_factor_space_expectation_equals_the_sigma_point_mean(parts):
    layout, pca, h, cond = parts
    ref = _sigma_point_deltas(layout, pca, h, cond, keep=1.0)[1]
    exact = ExpectedDelta(pca, h, layout, keep=1.0).exact_factors(cond)
    for name in layout.names:
        b, a = exact[name]
        got = b @ a
        assert float((got - ref[name]).norm() / ref[name].norm()) < 1e-5, name


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_truncated_expectation_matches_the_optimal_truncation(parts, rank):
    """Rank-truncated: the same LoRA as blend's optimal truncation of the sigma points (float64),
    with the same reported error."""
    layout, pca, h, cond = parts
    loras, _ = _sigma_point_deltas(layout, pca, h, cond, keep=1.0)
    want, want_report = blend(loras, [1.0 / len(loras)] * len(loras), rank=rank)
    ed = ExpectedDelta(pca, h, layout, keep=1.0)
    got, report = ed.lora(cond, rank)
    assert report.rank == want_report.rank
    assert report.overall_error == pytest.approx(want_report.overall_error, rel=2e-3, abs=1e-6)
    for name in layout.names:
        w, g = want.modules[name].delta(torch.float64), got.modules[name].delta(torch.float64)
        assert float((g - w).norm() / w.norm()) < 2e-3, (name, rank)
        assert report.module_errors[name] == pytest.approx(want_report.module_errors[name], rel=2e-3, abs=1e-6)
    assert got.modules[layout.names[0]].rank == report.rank
    # the global term is computed once per model, reused for the next face
    groups = ed.groups()
    ed.lora(cond + 0.1, rank)
    assert ed.groups() is groups


def test_the_global_term_follows_a_changed_hypernetwork(parts):
    layout, pca, h, cond = parts
    ed = ExpectedDelta(pca, h, layout)
    first = ed.lora(cond, 4)[0]
    old = h.spread_scale.clone()
    try:
        h.spread_scale.mul_(2.0)  # in place: the cached root and global term must be recomputed
        second = ed.lora(cond, 4)[0]
    finally:
        h.spread_scale.copy_(old)
    name = layout.names[2]
    assert not torch.allclose(first.modules[name].delta(), second.modules[name].delta())


def test_truncate_update_is_the_svd_of_the_sum():
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(2, 30, 6, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2, 25, 6, generator=gen, dtype=torch.float64))
    s = torch.rand(2, 6, generator=gen, dtype=torch.float64) + 0.1
    fb, fa = torch.randn(2, 30, 2, generator=gen, dtype=torch.float64), torch.randn(2, 2, 25, generator=gen, dtype=torch.float64)
    fb[1, :, 1] = u[1, :, 0]  # a new component inside the cached span (rank-deficient residual)
    uu, ss, vh = truncate_update(u, s, v.mT, fb, fa)
    full = (u * s[:, None]) @ v.mT + fb @ fa
    torch.testing.assert_close((uu * ss[:, None]) @ vh, full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ss, torch.linalg.svdvals(full)[:, : ss.shape[-1]], atol=1e-10, rtol=1e-10)


def test_orthonormal_spans_its_input_and_zeroes_empty_directions():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y[:, 4] = y[:, 0] + y[:, 1]  # rank 4
    q = orthonormal(y)
    gram = q.T @ q
    assert int((gram.diagonal() > 0.5).sum()) == 4
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-10, rtol=0)
    torch.testing.assert_close(q @ (q.T @ y), y, atol=1e-10, rtol=0)


def test_per_call_and_per_model_sampling_caches_change_nothing():
    """The sampler's cached condition embedding (once per call) and the cached inverse of
    ``resid_to_x0`` (once per model, recomputed when the buffer changes) give the same numbers."""
    gen = torch.Generator().manual_seed(1)
    h = _hypernet(gen, 0.4)
    for p in h.net.parameters():  # the output layers start at zero: give them weight
        p.data.normal_(0, 0.1, generator=gen)
    x, c, t = torch.randn(3, K, generator=gen), torch.randn(3, C, generator=gen), torch.tensor(500)
    for g in (1.0, 3.0):
        torch.testing.assert_close(h.guided_prediction(x, t, c, g, h.guidance_embedding(c, g)),
                                   h.guided_prediction(x, t, c, g), rtol=0, atol=0)
    h.resid_to_x0.copy_(torch.diag(torch.rand(K, generator=gen) + 0.5))
    first = h.from_x0(x, None)
    h.resid_to_x0.mul_(2.0)  # in place: the cached inverse must follow
    torch.testing.assert_close(h.from_x0(x, None) - h.latent_mean, (first - h.latent_mean) / 2, rtol=1e-5, atol=1e-6)
