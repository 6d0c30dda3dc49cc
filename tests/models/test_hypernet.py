"""Tests for the hypernetwork: closed-form kernel mean + residual diffusion, plain-torch sampler.

Everything runs on a toy world (latent = nonlinear function of 4 factors the condition sees and
2 it does not, condition = noisy unit-norm embedding of the visible ones), in seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorasynth.errors import ModelError
from lorasynth.models.hypernet import CONFIG_FILE, WEIGHTS_FILE, Hypernet, HypernetConfig
from lorasynth.training.hypernet import HypernetDiffusion, calibrate_sampling, energy_score
from lorasynth.models.hypernet.model import Denoiser, alphas_cumprod
from lorasynth.models.hypernet.regression import fit_kernel_mean

LATENT, COND = 32, 16


def toy_world(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (n, 32), conditions (n, 16)): 4 visible factors + 2 hidden ones."""
    g = torch.Generator().manual_seed(1234)  # fixed maps; `seed` only draws the identities
    P = torch.randn(COND, 4, generator=g)
    W1 = torch.randn(24, 4, generator=g)
    W2 = torch.randn(LATENT, 24, generator=g) / math.sqrt(24)
    H = torch.randn(LATENT, 2, generator=g)
    offset = torch.randn(LATENT, generator=g)
    gi = torch.Generator().manual_seed(seed)
    h, hidden = torch.randn(n, 4, generator=gi), torch.randn(n, 2, generator=gi)
    cond = torch.nn.functional.normalize(h @ P.T + 0.1 * torch.randn(n, COND, generator=gi), dim=1)
    latent = 3.0 * torch.tanh(h @ W1.T) @ W2.T + hidden @ H.T + offset + 0.05 * torch.randn(n, LATENT, generator=gi)
    return latent, cond


def small_config(**kw) -> HypernetConfig:
    return HypernetConfig(latent_dim=LATENT, cond_dim=COND, width=128, depth=2, emb_dim=64, **kw)


@pytest.fixture(scope="module")
def untrained() -> Hypernet:
    torch.manual_seed(0)
    z, c = toy_world(200)
    module = HypernetDiffusion.for_data(z, c, small_config(residual_condition=True))
    h = module.hypernet()
    with torch.no_grad():  # adaLN-Zero starts as a constant map; perturb it so the network matters
        for p in h.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return h


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hypernet trained through lorasynth.training.lightning.fit on 1,000 toy identities (200 for validation)."""
    from lorasynth.training.lightning import LossCurveCallback, TrainConfig, fit

    z, c = toy_world(1000, seed=0)
    zv, cv = toy_world(200, seed=1)
    cfg = TrainConfig(max_steps=400, batch_size=128, lr=2e-3, progress=False, seed=0, ckpt_every=1000)
    out = tmp_path_factory.mktemp("hypernet_train")
    torch.manual_seed(0)
    module = HypernetDiffusion.for_data(z, c, small_config(), val=(zv, cv), lr=cfg.lr, warmup_steps=20)
    trainer = fit(module, module.train_dataloader_for(cfg.batch_size, cfg.max_steps), out, cfg)
    history = next(cb for cb in trainer.callbacks if isinstance(cb, LossCurveCallback)).train
    return module.eval(), [v for _, v in history], out


# ---------------------------------------------------------------------------------------- model
def test_config_validation_and_roundtrip():
    cfg = small_config(prediction="eps")
    assert HypernetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.diffusers_prediction_type == "epsilon"
    with pytest.raises(ModelError):
        HypernetConfig(prediction="score")
    with pytest.raises(ModelError):
        HypernetConfig(beta_schedule="sigmoid")
    with pytest.raises(ModelError):
        HypernetConfig.from_dict({**cfg.to_dict(), "unknown_field": 1})


@pytest.mark.parametrize("schedule,zero_snr", [("squaredcos_cap_v2", False), ("linear", False),
                                               ("scaled_linear", True)])
def test_noise_schedule_matches_diffusers(schedule, zero_snr):
    from diffusers import DDPMScheduler

    ours = alphas_cumprod(small_config(beta_schedule=schedule, rescale_zero_snr=zero_snr))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-5, rtol=1e-4)


def test_denoiser_shapes_and_null_condition():
    torch.manual_seed(0)
    net = Denoiser(small_config()).eval()
    x, t, c = torch.randn(5, LATENT), torch.randint(0, 1000, (5,)), torch.randn(5, COND)
    assert net(x, t, c).shape == (5, LATENT)
    assert net(x, t, None).shape == (5, LATENT)
    with torch.no_grad():  # make the embeddings matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drop = torch.tensor([True, False, True, False, False])
    mixed, cond, uncond = net(x, t, c, drop), net(x, t, c), net(x, t, None)
    torch.testing.assert_close(mixed[drop], uncond[drop])
    torch.testing.assert_close(mixed[~drop], cond[~drop])
    assert not torch.allclose(cond, uncond)


# ---------------------------------------------------------------------------------------- sampling
def test_cfg_guidance_one_equals_conditional_and_batched_branches(untrained):
    m = untrained
    x, t = torch.randn(3, LATENT), torch.full((3,), 500)
    c = m.normalize_cond(toy_world(3, seed=5)[1])
    with torch.no_grad():
        cond_out, uncond_out = m.net(x, t, c), m.net(x, t, None)
        torch.testing.assert_close(m.guided_prediction(x, t, c, 1.0), cond_out, rtol=0, atol=0)
        torch.testing.assert_close(
            m.guided_prediction(x, t, c, 3.0), uncond_out + 3.0 * (cond_out - uncond_out), rtol=1e-5, atol=1e-5
        )


class _ZeroV(nn.Module):
    """The exact v-prediction for standard normal data is 0: E[v | x_t] = sqrt(a) sqrt(1-a) x_t - same."""

    def forward(self, x, t, cond=None, drop=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_turns_noise_into_the_right_spread(eta):
    """With the exact denoiser of N(0, I) data the DDIM sampler returns N(0, I) samples: the
    sampling noise really produces variance (the old model's samples had pairwise cosine 0.9999).
    Few steps shrink the samples, which is why the default is 100 steps."""
    h = Hypernet(small_config(residual_mean=False))
    h.net = _ZeroV()
    z = h.sample(None, n_samples=4000, num_steps=200, eta=eta, seed=0)
    assert abs(float(z.var(0).mean()) - 1.0) < 0.05
    assert abs(float(z.mean())) < 0.05
    assert h.sampling_defaults["num_steps"] >= 100
    few = h.sample(None, n_samples=4000, num_steps=10, eta=eta, seed=0)
    assert float(few.var(0).mean()) < 0.8


def test_sample_shapes_seed_reproducibility(untrained):
    _, c = toy_world(3, seed=7)
    kw = dict(num_steps=4, guidance=2.0, eta=1.0)
    a = untrained.sample(c, seed=11, **kw)
    assert a.shape == (3, LATENT) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, untrained.sample(c, seed=11, **kw))  # bit-identical
    assert not torch.equal(a, untrained.sample(c, seed=12, **kw))
    gen_a = untrained.sample(c, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(gen_a, untrained.sample(c, generator=torch.Generator().manual_seed(3), **kw))
    many = untrained.sample(c, seed=11, n_samples=4, **kw)
    assert many.shape == (12, LATENT)
    assert not torch.equal(many[0], many[1])  # different noise per sample of one condition
    assert untrained.sample(c[0], seed=1, **kw).shape == (1, LATENT)  # a single 1-d embedding
    assert untrained.sample(c, seed=11, scheduler="dpm", **kw).shape == (3, LATENT)  # version-1 name


def test_unconditional_sampling_and_bad_condition(untrained):
    z = untrained.sample(None, n_samples=5, num_steps=3, seed=0)
    assert z.shape == (5, LATENT) and torch.isfinite(z).all()
    assert not torch.allclose(z[0], z[1])
    with pytest.raises(ModelError, match="condition must be"):
        untrained.sample(torch.randn(2, COND + 1), num_steps=2)
    with pytest.raises(ModelError):
        untrained.sample(None, num_steps=0)
    with pytest.raises(ModelError):
        untrained.sample(None, scheduler="euler")


def test_x0_clipping():
    h = Hypernet(small_config(clip_sample=1.0))
    x, out, a = torch.randn(4, LATENT) * 3, torch.randn(4, LATENT) * 3, torch.tensor(0.4)
    for kind in ("x0", "v", "eps"):
        h.config.prediction = kind
        x0, eps = h.split_prediction(out, x, a)
        assert x0.abs().max() <= 1.0 + 1e-5
        torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x)


# ---------------------------------------------------------------------------------------- kernel mean
def test_kernel_mean_is_tuned_on_validation_and_residuals_are_cross_fitted():
    z, c = toy_world(800, seed=0)
    zv, cv = toy_world(200, seed=1)
    zt, ct = toy_world(200, seed=2)
    mu, sd = z.mean(0), z.std(0)
    model, resid, report = fit_kernel_mean(c, (z - mu) / sd, cv, (zv - mu) / sd, n_landmarks=256)
    assert report["chosen_on"] == "validation"
    test_mse = float((model(ct) - (zt - mu) / sd).pow(2).mean())
    assert test_mse < 0.5 * float(((zt - mu) / sd).pow(2).mean())  # far better than the mean
    in_sample = float((model(c) - (z - mu) / sd).pow(2).mean())
    # cross-fitted residuals have the size of held-out residuals, not the shrunken in-sample size
    assert float(resid.pow(2).mean()) > in_sample
    assert abs(float(resid.pow(2).mean()) - test_mse) < 0.3 * test_mse


# ---------------------------------------------------------------------------------------- export / load
def test_export_load_roundtrip_identical_samples(untrained, tmp_path):
    untrained.export(tmp_path, sampling={"guidance": 2.5})
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["config"]["latent_dim"] == LATENT and meta["sampling"]["guidance"] == 2.5
    loaded = Hypernet.load(tmp_path)
    assert loaded.sampling_defaults["guidance"] == 2.5
    for key in ("latent_mean", "latent_std", "cond_mean", "cond_scale", "landmarks", "coef", "gamma", "resid_std"):
        assert torch.equal(getattr(loaded, key), getattr(untrained, key)), key
    _, c = toy_world(2, seed=3)
    kw = dict(num_steps=5, guidance=2.5, seed=4, eta=1.0)
    close = dict(atol=1e-4, rtol=1e-5)  # same computation; cdist may round differently on copies
    torch.testing.assert_close(loaded.sample(c, **kw), untrained.sample(c, **kw), **close)
    torch.testing.assert_close(loaded.sample(None, seed=2, num_steps=3), untrained.sample(None, seed=2, num_steps=3),
                               **close)


def test_load_errors(tmp_path, untrained):
    with pytest.raises(ModelError, match="no hypernetwork"):
        Hypernet.load(tmp_path)
    untrained.export(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ModelError):
        Hypernet.load(tmp_path)
    untrained.export(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["config"]["width"] = 64  # weights no longer match the config
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="does not match"):
        Hypernet.load(tmp_path)


def test_loading_and_sampling_import_neither_lightning_nor_diffusers(untrained, tmp_path):
    untrained.export(tmp_path)
    code = ("import sys; from lorasynth.models.hypernet import Hypernet; import torch\n"
            f"h = Hypernet.load({str(tmp_path)!r}); h.sample(torch.randn(2, {COND}), num_steps=3)\n"
            "print(sorted(m for m in ('lightning', 'diffusers', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------------------------------- behaviour
def test_training_loss_falls(trained):
    _, losses, out = trained
    assert len(losses) >= 350
    first, last = sum(losses[:30]) / 30, sum(losses[-50:]) / 50
    assert last < 0.8 * first, (first, last)
    assert (out / "loss_curve.png").is_file()


def test_trained_samples_spread_like_held_out_people_and_average_to_the_mean(trained, tmp_path):
    module, _, _ = trained
    h = module.hypernet()
    z_test, c_test = toy_world(200, seed=99)  # held-out identities
    mean = h.denormalize_latent(h.conditional_mean(h.normalize_cond(c_test)))
    samples = h.sample(c_test, seed=0, num_steps=20, eta=1.0, n_samples=8).view(200, 8, -1)
    # not collapsed: samples of one face spread about as much as held-out truths around the mean
    spread = float((samples - samples.mean(1, keepdim=True)).pow(2).sum(-1).mean() * 8 / 7)
    truth_spread = float((z_test - mean).pow(2).sum(-1).mean())
    assert 0.5 * truth_spread < spread < 1.5 * truth_spread, (spread, truth_spread)
    # the mean of many samples is at least as close to the truth as the closed-form mean
    avg = samples.mean(1)
    assert float((avg - z_test).pow(2).sum(-1).mean()) < 1.1 * float((mean - z_test).pow(2).sum(-1).mean())
    # a proper scoring rule prefers the samples to a collapsed sampler (the mean repeated)
    zn = h.normalize_latent(z_test)
    es = energy_score(h.normalize_latent(samples), zn)
    es_collapsed = energy_score(h.normalize_latent(mean)[:, None].expand(-1, 8, -1), zn)
    assert es < es_collapsed
    # calibration picks sampler settings on validation people and records them
    zv, cv = toy_world(100, seed=1)
    report = calibrate_sampling(h, zv, cv, grid=((5, 0.0, 1.0), (10, 1.0, 1.0)))
    assert h.sampling_defaults["num_steps"] == report["chosen"]["num_steps"]
    loaded = Hypernet.load(h.export(tmp_path))
    torch.testing.assert_close(loaded.sample(c_test[:4], seed=1), h.sample(c_test[:4], seed=1), atol=1e-4, rtol=1e-5)


def test_resume_from_lightning_checkpoint(trained):
    """fit(resume=True) restores weights, EMA and statistics from last.ckpt (weights_only) and trains on."""
    from lorasynth.training.lightning import TrainConfig, fit

    module, _, out = trained
    cfg = TrainConfig(max_steps=410, batch_size=128, lr=2e-3, progress=False, seed=0, ckpt_every=1000)
    fresh = HypernetDiffusion(small_config(), lr=cfg.lr, warmup_steps=20)  # stats come from the checkpoint
    fresh.train_pairs = module.train_pairs
    trainer = fit(fresh, fresh.train_dataloader_for(cfg.batch_size, cfg.max_steps), out, cfg, resume=True)
    assert trainer.global_step == 410
    assert int(fresh.ema_updates) == 410
    for key in ("latent_mean", "cond_scale", "landmarks", "coef"):
        assert torch.equal(getattr(fresh.model, key), getattr(module.model, key))


def test_neighbour_mean_mix_chosen_on_validation_cross_fitted_by_person_and_exported(tmp_path):
    from lorasynth.models.hypernet.regression import MIX_GRID, NeighbourMean, cross_fit_neighbours, fit_neighbour_mean, make_folds

    z, c = toy_world(400, seed=0)
    z, c = z.repeat_interleave(2, 0), c.repeat_interleave(2, 0)  # two LoRAs per person, one embedding
    groups = torch.arange(800) // 2
    zv, cv = toy_world(200, seed=1)
    zt, ct = toy_world(200, seed=2)
    module = HypernetDiffusion.for_data(z, c, small_config(), val=(zv, cv), groups=groups)
    rep = module.mean_report
    errs = rep["mix_validation_mse"]
    assert rep["mix_ridge_weight"] in MIX_GRID and errs[f"{rep['mix_ridge_weight']:g}"] == min(errs.values())
    # cross-fitting keeps a person's rows in one fold: residuals have the held-out size, not ~0
    mu, sd = z.mean(0), z.std(0)
    nb, _ = fit_neighbour_mean(c, (z - mu) / sd, cv, (zv - mu) / sd)
    nb.tau = 0.01
    cf = cross_fit_neighbours(nb, c, make_folds(800, 5, groups))
    cf_mse = float((cf - (z - mu) / sd).pow(2).mean())
    test_mse = float((nb(ct) - (zt - mu) / sd).pow(2).mean())
    assert float((nb(c) - (z - mu) / sd).pow(2).mean()) < 0.2 * test_mse  # in-sample: its twin answers
    assert abs(cf_mse - test_mse) < 0.3 * test_mse
    # a mixed mean survives export / load
    h = module.hypernet()
    h.nb_cond, h.nb_z = nb.cond.clone(), nb.z.clone()
    h.nb_k.fill_(nb.k)
    h.nb_tau.fill_(0.1)
    h.mix.fill_(0.5)
    cn = h.normalize_cond(ct)
    neighbours_only = NeighbourMean(nb.cond, nb.z, nb.k, 0.1)(ct)
    assert not torch.allclose(h.conditional_mean(cn), neighbours_only)
    loaded = Hypernet.load(h.export(tmp_path))
    torch.testing.assert_close(loaded.conditional_mean(loaded.normalize_cond(ct)), h.conditional_mean(cn))


def test_residual_model_trains_on_neighbour_pairs_and_local_covariance_is_chosen_on_validation():
    """The conditioned residual model learns p(residual | face) from pairs (face i, residual of one of
    its k nearest training faces, itself included); k and the local covariance are chosen on
    validation people, and the expected delta W's sigma points carry exactly that covariance."""
    from lorasynth.training.hypernet import NeighbourPairs
    from lorasynth.models.hypernet.regression import PAIR_K, top_neighbours

    z, c = toy_world(400, seed=0)
    zv, cv = toy_world(120, seed=1)
    module = HypernetDiffusion.for_data(z, c, small_config(), val=(zv, cv))
    h = module.model
    assert module.pair_report["k"] in PAIR_K and module.pair_neighbours.shape == (400, module.pair_report["k"])
    assert h.local_covariance and module.cov_report["k"] > 0
    loader = module.train_dataloader_for(64, 10)
    assert isinstance(loader.dataset, NeighbourPairs) and len(loader.dataset) == 400 * module.pair_report["k"]
    x0, cond = module.train_pairs
    nb = top_neighbours(c, c, module.pair_report["k"])
    assert (nb[:, 0] == torch.arange(400)).all()  # a face's own residual is among its pairs
    pair_x0, pair_c = loader.dataset[5 * nb.shape[1] + 2]
    assert torch.equal(pair_c, cond[5]) and torch.equal(pair_x0, x0[nb[5, 2]])
    # the covariance differs between faces and is positive semi-definite
    cov = h.residual_covariance(h.normalize_cond(cv[:2]))
    assert not torch.allclose(cov[0], cov[1])
    assert float(torch.linalg.eigvalsh(cov.double()).min()) > -1e-6
    # sigma points: mean and covariance of the expected-delta-W construction are the model's
    pts = h.normalize_latent(h.expected_latents(cv[:1])).double()
    mean = h.conditional_mean(h.normalize_cond(cv[:1])).double()[0]
    torch.testing.assert_close(pts.mean(0), mean, atol=1e-4, rtol=1e-4)
    emp = (pts - mean).T @ (pts - mean) / len(pts)
    torch.testing.assert_close(emp, cov[0].double() * float(h.spread_scale.mean()) ** 2, atol=1e-3, rtol=1e-3)


def test_a_hypernet_file_with_mismatched_covariance_tensors_is_one_model_error(tmp_path):
    from safetensors.torch import load_file, save_file

    z, c = toy_world(200, seed=0)
    zv, cv = toy_world(60, seed=1)
    h = HypernetDiffusion.for_data(z, c, small_config(), val=(zv, cv)).hypernet()
    assert h.local_covariance
    h.export(tmp_path)
    Hypernet.load(tmp_path).sample(cv[:2], num_steps=3)  # the intact file loads and samples
    tensors = load_file(str(tmp_path / "hypernet.safetensors"))
    tensors["cov_resid"] = tensors["cov_resid"][:, :5].contiguous()  # wrong latent width
    save_file(tensors, str(tmp_path / "hypernet.safetensors"), {"format": "lorasynth-hypernet", "version": "2"})
    with pytest.raises(ModelError, match="do not match"):
        Hypernet.load(tmp_path)
    # a file from before the scaling was named resid_to_x0 has the covariance but not the scaling:
    # loading it with an identity scaling would sample on the wrong scale without a word
    h.export(tmp_path)
    tensors = load_file(str(tmp_path / "hypernet.safetensors"))
    tensors["resid_whiten"] = tensors.pop("resid_to_x0")
    save_file(tensors, str(tmp_path / "hypernet.safetensors"), {"format": "lorasynth-hypernet", "version": "2"})
    with pytest.raises(ModelError, match="without resid_to_x0"):
        Hypernet.load(tmp_path)


def test_solve_temperature_widens_until_bracketed_and_says_when_it_cannot():
    """The temperature is solved over 0.05..3, not clamped at a grid's edge (the old grid stopped at
    0.5: a target needing 0.1 got 0.5, silently); an unreachable target is reported, not hidden."""
    import math

    from lorasynth.training.hypernet import solve_temperature

    calls = []

    def alike(t):  # pairwise cosine falls as the temperature rises
        calls.append(t)
        return math.exp(-t)

    for target in (0.9, 0.5, 0.2):
        t, report = solve_temperature(alike, target)
        assert report["reached"] and "fell_back" not in report
        assert abs(math.exp(-t) - target) <= 0.003 and abs(report["cosine_at_temperature"] - target) <= 0.003
    assert abs(solve_temperature(alike, 0.9)[0] - 0.1054) < 0.01  # below the old grid's 0.5
    assert abs(solve_temperature(alike, 0.2)[0] - 1.609) < 0.01
    for target, bound in ((0.99, 0.05), (0.01, 3.0)):  # beyond the range: the bound, and it says so
        t, report = solve_temperature(alike, target)
        assert t == bound and not report["reached"] and "not reachable" in report["fell_back"]
    calls.clear()
    solve_temperature(alike, 0.5)
    assert len(calls) <= 16  # each evaluation decodes samples: a bounded number


def test_temperature_makes_samples_as_alike_as_the_spread_target(trained):
    """With a spread target, the calibrated temperature gives one face's samples that mean pairwise
    cosine (here plain cosines of latents stand in for delta-W cosines), checked on fresh samples."""
    from lorasynth.training.hypernet import temperature_for_spread

    assert temperature_for_spread({0.5: 0.8, 1.0: 0.6, 1.5: 0.4}, 0.7) == 0.75

    def cosines(x):
        x = x / x.norm(dim=-1, keepdim=True)
        return x @ x.transpose(1, 2)

    module, _, _ = trained
    h = module.hypernet()
    zv, cv = toy_world(100, seed=1)
    for target in (0.8, 0.93):  # the toy latents share a large mean: raw cosines are high
        report = calibrate_sampling(h, zv, cv, grid=((10, 1.0, 1.0),), pairwise=cosines, spread=(target, {"k": 1}))
        assert float(h.spread_scale.mean()) == pytest.approx(report["chosen"]["temperature"]) and report["chosen"]["temperature"] != 1.0
        x = h.sample(cv, num_steps=10, eta=1.0, n_samples=4).view(100, 4, -1)
        alike = float(cosines(x)[:, ~torch.eye(4, dtype=torch.bool)].mean())
        assert abs(alike - target) < 0.03, (target, alike, report["pairwise_cosine_by_temperature"])
        assert report["temperature_solve"]["reached"] and report["achieved"]["target_reached"]
        assert abs(report["achieved"]["pairwise_cosine"] - target) < 0.03  # measured on another seed's samples
    assert "look-alike" in report["temperature_rule"]
    # a target the model cannot reach in 0.05..3 is recorded as a fallback, with the spread it did reach
    report = calibrate_sampling(h, zv, cv, grid=((10, 1.0, 1.0),), pairwise=cosines, spread=(1.5, {"k": 1}))
    assert not report["temperature_solve"]["reached"] and report["chosen"]["temperature"] == 0.05
    assert not report["achieved"]["target_reached"] and "not reachable" in report["achieved"]["fell_back"]
