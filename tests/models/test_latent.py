"""Latent models: PCA (w2w baseline) and the LoRA-VAE (a PCA linear path plus a nonlinear residual, never
below PCA; and the version-1 chunked network), trained through lorasynth.training.lightning."""

from __future__ import annotations

import csv
import re
import shutil

import numpy as np
import pytest
import torch

from lorasynth.errors import ModelError
from lorasynth.models.latent import LatentModel, load_latent, reconstruction_cosine
from lorasynth.models.latent.pca import PCA, fit_pca
from lorasynth.training.latent import LoRAVAE, VAEConfig, VAENet, chunk_geometry, train_vae
from lorasynth.models.latent.vae import expected_shapes
from lorasynth.core.layout import Layout
from lorasynth.library.pack import open_pack
from lorasynth.library.splits import train_test_split
from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack
from lorasynth.training.lightning import TrainConfig, fit, resolve_devices

# the default architecture (PCA linear path + nonlinear residual), trained on coefficient rows: seconds
TEST_VAE = VAEConfig(latent_dim=64, kl_warmup=100, lr_warmup=20)
TEST_STEPS = 200
# the version-1 chunked network, small enough to train in ~20 s on a shared CPU core
CHUNKED_VAE = VAEConfig(arch="chunked", latent_dim=64, d_model=64, enc_layers=1, dec_layers=1, kl_warmup=100,
                        lr_warmup=20)



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
    """(train, validation, test) rows: one LoRA per identity, so rows are people."""
    train, test = train_test_split(2000, 0.2, seed=0)
    return train[:-300], train[-300:], test


@pytest.fixture(scope="module")
def trained(tiny_pack, split, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    cfg = TrainConfig(max_steps=TEST_STEPS, batch_size=64, lr=3e-3, progress=False, log_every=20, ckpt_every=100)
    model = train_vae(tiny_pack, out, TEST_VAE, cfg, train_idx=split[0], val_idx=split[1])
    return model, out, cfg


def test_pca_on_a_pack(tiny_pack, split):
    pca = fit_pca(tiny_pack, k=16, idx=split[0])
    assert pca.layout_signature == tiny_pack.layout.signature and pca.n_fit == len(split[0])
    streamed = fit_pca(tiny_pack, k=16, idx=split[0], exact_max_bytes=0, batch_rows=300)
    a = reconstruction_cosine(pca, tiny_pack, split[2])
    b = reconstruction_cosine(streamed, tiny_pack, split[2])
    assert 0.8 < a < 1.0 and abs(a - b) < 2e-3


def test_vae_starts_as_pca_exactly(tiny_pack, split):
    """The linear path is PCA and the residual MLPs' outputs start at zero: at initialisation the VAE is
    the PCA of its size (encode, decode, prior), so training starts from PCA's reconstruction."""
    pca = fit_pca(tiny_pack, k=16, idx=split[0])
    big = fit_pca(tiny_pack, k=16 + 8, idx=split[0])
    vae = VAENet(VAEConfig(latent_dim=16, residual_components=8), tiny_pack.dim, pca=big)
    x = pca.standardize(tiny_pack.read_rows(split[2][:50]))
    with torch.no_grad():
        torch.testing.assert_close(vae.standardize(tiny_pack.read_rows(split[2][:50])), x, rtol=0, atol=0)
        torch.testing.assert_close(vae.encode(x), pca.encode(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(vae.decode(pca.encode(x)), pca.decode(pca.encode(x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.sample_latent(3, torch.Generator().manual_seed(0)),
                                   pca.sample_latent(3, torch.Generator().manual_seed(0)))
    assert reconstruction_cosine(vae, tiny_pack, split[2], metric="delta") == pytest.approx(
        reconstruction_cosine(pca, tiny_pack, split[2], metric="delta"), abs=1e-6)


def test_vae_is_never_below_pca_of_its_size(trained, tiny_pack, split):
    """Held-out people (neither trained on nor used to choose the state): the VAE at least PCA's ΔW cosine."""
    model, _, _ = trained
    assert model.latent_dim == 64
    pca = fit_pca(tiny_pack, k=64, idx=split[0])
    vae_cos = reconstruction_cosine(model, tiny_pack, split[2], metric="delta")
    pca_cos = reconstruction_cosine(pca, tiny_pack, split[2], metric="delta")
    print({"vae": vae_cos, "pca": pca_cos, "selection": model.selection})
    assert vae_cos >= pca_cos - 1e-6, (vae_cos, pca_cos)
    sel = model.selection
    assert sel["validation_rows"] == len(split[1]) and sel["chosen"] >= sel["pca_linear_path"]
    assert sel["pca_linear_path"] == pytest.approx(reconstruction_cosine(pca, tiny_pack, split[1], metric="delta"),
                                                   abs=1e-5)
    assert [s for s, _ in sel["history"]] == [0, 50, 100, 150, 200]  # PCA, then every validation
    assert reconstruction_cosine(model, tiny_pack, split[2]) >= 0.95
    per_item = reconstruction_cosine(model, tiny_pack, split[2][:10], per_item=True)
    assert per_item.shape == (10,)


def test_vae_falls_back_to_pca_where_its_residual_does_not_help(tmp_path):
    """420 training people for a 64-d latent that already keeps 0.998 of ΔW: the residual overfits (its
    validation score falls below PCA's as it trains), so the PCA linear path is kept, and held-out
    people get exactly PCA's reconstruction (training's last state would be below it)."""
    world = make_world(SyntheticWorldConfig(n_identities=600, layout=tiny_layout(), seed=0))
    pack = open_pack(write_world_pack(world, tmp_path / "pack"))
    train, val, test = np.arange(420), np.arange(420, 510), np.arange(510, 600)
    cfg = TrainConfig(max_steps=600, batch_size=128, lr=2e-3, progress=False, log_every=50, ckpt_every=10**6)
    model = train_vae(pack, tmp_path / "run", VAEConfig(latent_dim=64), cfg, train_idx=train, val_idx=val)
    vae_cos = reconstruction_cosine(model, pack, test, metric="delta")
    pca_cos = reconstruction_cosine(fit_pca(pack, 64, idx=train), pack, test, metric="delta")
    print({"vae": vae_cos, "pca": pca_cos, "selection": model.selection})
    assert vae_cos >= pca_cos - 1e-6, (vae_cos, pca_cos)
    assert not model.selection["residual_used"] and model.selection["history"][-1][1] < model.selection["chosen"]


def test_vae_beats_pca_on_a_curved_world_at_a_small_latent(tmp_path):
    """Two hidden factors through strongly curved maps (gain 3): PCA with 2 components keeps ~0.8 of ΔW;
    the residual bends the 2-d latent through the next principal directions."""
    world = make_world(SyntheticWorldConfig(n_identities=1000, layout=tiny_layout(), seed=1, n_factors=2, gain=3.0))
    pack = open_pack(write_world_pack(world, tmp_path / "pack"))
    train, val, test = np.arange(700), np.arange(700, 850), np.arange(850, 1000)
    cfg = TrainConfig(max_steps=800, batch_size=128, lr=2e-3, progress=False, log_every=50, ckpt_every=10**6)
    model = train_vae(pack, tmp_path / "run", VAEConfig(latent_dim=2), cfg, train_idx=train, val_idx=val)
    vae_cos = reconstruction_cosine(model, pack, test, metric="delta")
    pca_cos = reconstruction_cosine(fit_pca(pack, 2, idx=train), pack, test, metric="delta")
    print({"vae": vae_cos, "pca": pca_cos, "selection": model.selection})
    assert model.latent_dim == 2 and model.selection["residual_used"]
    assert vae_cos > pca_cos + 0.1, (vae_cos, pca_cos)


def test_train_latent_vae_prints_pca_beside_it(tmp_path, capsys):
    """``train latent --kind vae`` reports the VAE's and PCA's validation reconstruction at the same size."""
    from lorasynth.apps.cli.main import main

    world = make_world(SyntheticWorldConfig(n_identities=300, layout=tiny_layout(), seed=1, n_factors=2, gain=3.0))
    pack = write_world_pack(world, tmp_path / "pack")
    assert main(["train", "latent", "--kind", "vae", "--pack", str(pack), "--out", str(tmp_path / "m"), "--latent-dim",
                 "2", "--steps", "200", "--batch-size", "64", "--lr", "2e-3", "--no-progress", "--accelerator", "cpu",
                 "--devices", "1"]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("validation reconstruction"))
    vae, pca = (float(v) for v in re.findall(r"(?:VAE|PCA at k=2) (\d\.\d+)", line))
    assert "VAE" in line and "PCA at k=2" in line and vae > pca, out


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
    assert loaded.config.arch == "pca_residual" and loaded.selection == model.selection
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
    model0, out, cfg = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    more = TrainConfig(**{**cfg.to_dict(), "max_steps": TEST_STEPS + 20})
    fresh = LoRAVAE(model0.config, tiny_pack.dim, layout_signature=tiny_pack.layout.signature, lr=cfg.lr)
    model = train_vae(tiny_pack, run, model0.config, more, train_idx=split[0], resume=True, model=fresh)
    assert model.global_step == TEST_STEPS + 20
    torch.testing.assert_close(model.basis, model0.basis)  # the run's linear path came back from the checkpoint
    assert reconstruction_cosine(model, tiny_pack, split[2]) >= 0.95  # continued, not restarted
    assert (run / "loss_curve.png").is_file()
    curve = next(c for c in model.trainer.callbacks if type(c).__name__ == "LossCurveCallback")
    assert len(curve.train) == TEST_STEPS + 20  # the history came back from the checkpoint
    with pytest.raises(ModelError, match="cannot resume"):
        fit(fresh, None, tmp_path / "empty", more, resume=True)


def test_chunked_vae_trains_and_version_1_files_still_load(tiny_pack, split, tmp_path):
    """The version-1 network (``arch="chunked"``) still trains, and a ``vae.json`` written before the
    architecture field existed (version 1, no ``arch``) loads as that network, unchanged."""
    import json

    cfg = TrainConfig(max_steps=30, batch_size=64, lr=3e-3, progress=False, log_every=10, ckpt_every=10**6)
    model = train_vae(tiny_pack, tmp_path / "run", CHUNKED_VAE, cfg, train_idx=split[0][:400])
    assert model.global_step == 30 and model.selection is None
    model.export(tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / "vae.json").read_text())
    assert meta["version"] == 2 and meta["config"]["arch"] == "chunked"
    old = {**meta, "version": 1, "config": {k: v for k, v in meta["config"].items()
                                            if k in ("latent_dim", "n_tokens", "min_chunk", "chunk_rank", "token_dim",
                                                     "d_model", "n_heads", "enc_layers", "dec_layers", "ff_mult",
                                                     "dropout", "beta_max", "kl_warmup", "input_noise", "latent_noise",
                                                     "weight_decay", "lr_warmup")}}
    shutil.copytree(tmp_path / "v2", tmp_path / "v1")
    (tmp_path / "v1" / "vae.json").write_text(json.dumps(old))
    loaded = load_latent(tmp_path / "v1")
    assert isinstance(loaded, VAENet) and loaded.config.arch == "chunked"
    x = loaded.standardize(tiny_pack.read_rows(split[2][:8]))
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
    for version in (0, 3, "2", True):
        (tmp_path / "v1" / "vae.json").write_text(json.dumps({**old, "version": version}))
        with pytest.raises(ModelError, match="version 1 or 2"):
            load_latent(tmp_path / "v1")


@pytest.mark.parametrize("edit", [{"residual_width": 65536}, {"residual_layers": 200}, {"encoder_layers": 7},
                                  {"residual_components": 65536}, {"latent_dim": 5}, {"arch": "mlp"},
                                  {"arch": 3}, {"posterior_logvar": "x"}])
def test_pca_residual_config_fields_are_checked(tmp_path, edit):
    """A hostile PCA-residual ``vae.json`` is one ModelError line, before any weight is allocated."""
    import json

    big = fit_pca(_low_rank(60, 40, rank=8), k=12)
    VAENet(VAEConfig(latent_dim=4, residual_components=8, residual_width=8), 40, pca=big).export(tmp_path)
    meta = json.loads((tmp_path / "vae.json").read_text())
    meta["config"].update(edit)
    (tmp_path / "vae.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as err:
        load_latent(tmp_path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_vae_sizes_and_input_checks():
    w2w = Layout.w2w()
    assert chunk_geometry(w2w.size, VAEConfig()) == (64, 1557, 32)
    assert chunk_geometry(768, VAEConfig()) == (24, 32, 32)
    model = LoRAVAE(VAEConfig(arch="chunked"), w2w.size)
    assert 5_000_000 < model.num_parameters() < 12_000_000  # bounded: ~2 * D * 32 + const
    with pytest.raises(ModelError, match="shape"):
        model.encode(torch.zeros(2, 10))
    # PCA-residual: the trained parameters do not grow with D (the basis is a fixed buffer of D x K)
    shapes = expected_shapes(VAEConfig(latent_dim=512), w2w.size)
    assert shapes["basis"] == (w2w.size, 576)
    trained = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(("enc_res", "dec_res", "logvar")))
    assert trained < 700_000
    assert resolve_devices(TrainConfig()) in (1, "auto")
    if not torch.cuda.is_available():
        assert resolve_devices(TrainConfig()) == 1
