"""Latent models: PCA (w2w baseline) and the LoRA-VAE trained through lorasynth.training.lightning."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

from lorasynth.errors import ModelError
from lorasynth.models.latent import LatentModel, load_latent, reconstruction_cosine
from lorasynth.models.latent.pca import PCA, fit_pca
from lorasynth.training.latent import LoRAVAE, VAEConfig, VAENet, chunk_geometry, train_vae
from lorasynth.core.layout import Layout
from lorasynth.library.pack import open_pack
from lorasynth.library.splits import train_test_split
from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack
from lorasynth.training.lightning import TrainConfig, fit, resolve_devices

# small enough to train in ~20 s on a shared CPU core; the default config is for real layouts
TEST_VAE = VAEConfig(latent_dim=64, d_model=64, enc_layers=1, dec_layers=1, kl_warmup=100, lr_warmup=20)
TEST_STEPS = 200



# --------------------------------------------------------------------------- PCA


def _low_rank(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
    return (x * rng.uniform(0.5, 2.0, d) + rng.standard_normal(d) * 3).astype(np.float32)


@pytest.mark.parametrize("n,d", [(300, 120), (80, 400)])
def test_pca_is_exact_on_low_rank_data_both_paths(n, d):
    raw = _low_rank(n, d, rank=5)
    exact = fit_pca(raw, k=5)
    streamed = fit_pca(raw, k=5, exact_max_bytes=0, batch_rows=37, n_iter=2)
    for pca in (exact, streamed):
        assert pca.latent_dim == 5 and pca.dim == d
        rec = pca.destandardize(pca.decode(pca.encode(pca.standardize(raw)))).numpy()
        assert np.abs(rec - raw).max() / np.abs(raw).max() < 1e-4
        torch.testing.assert_close(pca.components.T @ pca.components, torch.eye(5), atol=1e-4, rtol=0)
        assert pca.explained_variance_ratio == pytest.approx(1.0, abs=1e-4)
    # same subspace and spectrum
    overlap = torch.linalg.svdvals(exact.components.T @ streamed.components)
    assert overlap.min() > 0.9999
    torch.testing.assert_close(exact.singular_values, streamed.singular_values, rtol=1e-3, atol=1e-3)
    assert reconstruction_cosine(exact, raw) > 0.99999


def test_pca_truncation_keeps_the_top_components():
    raw = _low_rank(200, 60, rank=20, seed=1)
    full, top = fit_pca(raw, k=20), fit_pca(raw, k=4, exact_max_bytes=0, n_iter=3)
    overlap = torch.linalg.svdvals(full.components[:, :4].T @ top.components)
    assert overlap.min() > 0.99
    assert 0 < top.explained_variance_ratio < full.explained_variance_ratio


def test_pca_sampling_uses_coefficient_stats():
    raw = _low_rank(400, 50, rank=6, seed=2)
    pca = fit_pca(raw, k=6)
    coefs = pca.encode(pca.standardize(raw))
    torch.testing.assert_close(pca.coef_mean, coefs.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.coef_std, coefs.std(0, correction=0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pca.coef_std.double() ** 2, pca.explained_variance, rtol=1e-3, atol=1e-6)
    z = pca.sample_latent(40000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), pca.coef_mean, atol=0.03 * float(pca.coef_std.max()), rtol=0)
    torch.testing.assert_close(z.std(0), pca.coef_std, rtol=0.02, atol=0)
    assert pca.sample(3, torch.Generator().manual_seed(0)).shape == (3, 50)
    # zero coefficients decode to the mean LoRA, as in w2w
    torch.testing.assert_close(pca.destandardize(pca.decode(torch.zeros(1, 6)))[0],
                               torch.from_numpy(raw.mean(0)), atol=1e-3, rtol=1e-4)


def test_pca_export_load_and_errors(tmp_path):
    raw = _low_rank(100, 40, rank=3)
    pca = fit_pca(raw, k=3)
    pca.export(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["pca.json", "pca.safetensors"]
    loaded = load_latent(tmp_path / "m")
    assert isinstance(loaded, PCA) and isinstance(loaded, LatentModel)
    x = pca.standardize(raw[:5])
    assert torch.equal(loaded.encode(x), pca.encode(x))
    assert torch.equal(loaded.decode(pca.encode(x)), pca.decode(pca.encode(x)))
    with pytest.raises(ModelError, match="k=50"):
        fit_pca(raw, k=50)
    (tmp_path / "m" / "pca.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError):
        PCA.load(tmp_path / "m")
    with pytest.raises(ModelError, match="no latent model"):
        load_latent(tmp_path / "nothing")


# --------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    world = make_world(SyntheticWorldConfig(n_identities=2000, layout=tiny_layout(), seed=0))
    return open_pack(write_world_pack(world, tmp_path_factory.mktemp("vae") / "pack"))


@pytest.fixture(scope="module")
def split():
    return train_test_split(2000, 0.2, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_pack, split, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    cfg = TrainConfig(max_steps=TEST_STEPS, batch_size=64, lr=3e-3, progress=False, log_every=20, ckpt_every=100)
    model = train_vae(tiny_pack, out, TEST_VAE, cfg, train_idx=split[0], val_idx=split[1][:128])
    return model, out, cfg


def test_pca_on_a_pack(tiny_pack, split):
    pca = fit_pca(tiny_pack, k=16, idx=split[0])
    assert pca.layout_signature == tiny_pack.layout.signature and pca.n_fit == len(split[0])
    streamed = fit_pca(tiny_pack, k=16, idx=split[0], exact_max_bytes=0, batch_rows=300)
    a = reconstruction_cosine(pca, tiny_pack, split[1])
    b = reconstruction_cosine(streamed, tiny_pack, split[1])
    assert 0.8 < a < 1.0 and abs(a - b) < 2e-3


def test_vae_reaches_high_heldout_reconstruction(trained, tiny_pack, split):
    model, _, _ = trained
    cos = reconstruction_cosine(model, tiny_pack, split[1])
    assert cos >= 0.95, cos
    assert reconstruction_cosine(model, tiny_pack, split[1], metric="delta") >= 0.9
    per_item = reconstruction_cosine(model, tiny_pack, split[1][:10], per_item=True)
    assert per_item.shape == (10,)


def test_training_outputs_logs_curve_and_checkpoint(trained):
    model, out, cfg = trained
    assert model.global_step == TEST_STEPS
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("train_loss", "recon", "kl", "beta", "val_loss"):
        assert any(r.get(key) for r in rows), key
    betas = [float(r["beta"]) for r in rows if r.get("beta")]
    assert betas[0] < TEST_VAE.beta_max and betas[-1] == pytest.approx(TEST_VAE.beta_max)  # KL warm-up
    assert model.beta() == pytest.approx(TEST_VAE.beta_max)


def test_vae_export_load_round_trip(trained, tiny_pack, tmp_path):
    model, _, _ = trained
    model.export(tmp_path / "vae")
    loaded = load_latent(tmp_path / "vae")
    assert isinstance(loaded, VAENet) and isinstance(loaded, LatentModel)
    assert not isinstance(loaded, LoRAVAE)  # plain torch: loading needs no Lightning
    assert loaded.layout_signature == tiny_pack.layout.signature and loaded.latent_dim == 64
    x = loaded.standardize(tiny_pack.read_rows(np.arange(8)))
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        z = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded.decode(z), model.decode(z))
        assert torch.equal(loaded.sample(2, torch.Generator().manual_seed(3)), model.sample(2, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(loaded.destandardize(x), torch.from_numpy(tiny_pack.read_rows(np.arange(8))), rtol=1e-5, atol=1e-6)
    (tmp_path / "vae" / "vae.json").write_text('{"format": "something-else"}')
    with pytest.raises(ModelError):
        LoRAVAE.load(tmp_path / "vae")


def test_vae_resume_from_last_checkpoint(trained, tiny_pack, split, tmp_path):
    _, out, cfg = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    more = TrainConfig(**{**cfg.to_dict(), "max_steps": TEST_STEPS + 20})
    fresh = LoRAVAE(TEST_VAE, tiny_pack.dim, tiny_pack.mean, tiny_pack.scale, tiny_pack.layout.signature, lr=cfg.lr)
    model = train_vae(tiny_pack, run, TEST_VAE, more, train_idx=split[0], resume=True, model=fresh)
    assert model.global_step == TEST_STEPS + 20
    assert reconstruction_cosine(model, tiny_pack, split[1]) >= 0.95  # continued, not restarted
    assert (run / "loss_curve.png").is_file()
    curve = next(c for c in model.trainer.callbacks if type(c).__name__ == "LossCurveCallback")
    assert len(curve.train) == TEST_STEPS + 20  # the history came back from the checkpoint
    with pytest.raises(ModelError, match="cannot resume"):
        fit(fresh, None, tmp_path / "empty", more, resume=True)


def test_vae_sizes_and_input_checks():
    w2w = Layout.w2w()
    assert chunk_geometry(w2w.size, VAEConfig()) == (64, 1557, 32)
    assert chunk_geometry(768, VAEConfig()) == (24, 32, 32)
    model = LoRAVAE(VAEConfig(), w2w.size)
    assert 5_000_000 < model.num_parameters() < 12_000_000  # bounded: ~2 * D * 32 + const
    with pytest.raises(ModelError, match="shape"):
        model.encode(torch.zeros(2, 10))
    assert resolve_devices(TrainConfig()) in (1, "auto")
    if not torch.cuda.is_available():
        assert resolve_devices(TrainConfig()) == 1
