"""Tests for the hypernetwork (conditional latent diffusion: face embedding -> LoRA latent).

Everything runs on a tiny planted world (latent = nonlinear function of hidden factors, condition
= noisy unit-norm embedding of the same factors), so the whole file takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorasynth.errors import ModelError
from lorasynth.hypernet import HypernetConfig
from lorasynth.hypernet.diffusion import CONFIG_FILE, WEIGHTS_FILE, HypernetDiffusion, latent_dataloader
from lorasynth.hypernet.model import Denoiser

LATENT, COND = 32, 16


def toy_world(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (n, 32), conditions (n, 16)): both driven by 4 hidden factors."""
    g = torch.Generator().manual_seed(1234)  # fixed maps; `seed` only draws the identities
    P = torch.randn(COND, 4, generator=g)
    W1 = torch.randn(24, 4, generator=g)
    W2 = torch.randn(LATENT, 24, generator=g) / math.sqrt(24)
    offset = torch.randn(LATENT, generator=g)
    gi = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 4, generator=gi)
    cond = torch.nn.functional.normalize(h @ P.T + 0.1 * torch.randn(n, COND, generator=gi), dim=1)
    latent = 3.0 * torch.tanh(h @ W1.T) @ W2.T + offset + 0.05 * torch.randn(n, LATENT, generator=gi)
    return latent, cond


def small_config(**kw) -> HypernetConfig:
    return HypernetConfig(latent_dim=LATENT, cond_dim=COND, width=128, depth=2, emb_dim=64, **kw)


@pytest.fixture(scope="module")
def untrained() -> HypernetDiffusion:
    torch.manual_seed(0)
    z, c = toy_world(64)
    module = HypernetDiffusion.for_data(z, c, small_config())
    # adaLN-Zero starts as a constant map; perturb it so sampling tests see a non-trivial network.
    with torch.no_grad():
        for p in module.sampling_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hypernet trained through lorasynth.training.fit on 1,000 toy identities."""
    from lorasynth.training import LossCurveCallback, TrainConfig, fit

    z, c = toy_world(1000, seed=0)
    cfg = TrainConfig(max_steps=400, batch_size=128, lr=2e-3, progress=False, seed=0, ckpt_every=1000)
    out = tmp_path_factory.mktemp("hypernet_train")
    torch.manual_seed(0)
    module = HypernetDiffusion.for_data(z, c, small_config(), lr=cfg.lr, warmup_steps=20)
    trainer = fit(module, latent_dataloader(z, c, cfg.batch_size, seed=0), out, cfg)
    history = next(cb for cb in trainer.callbacks if isinstance(cb, LossCurveCallback)).train
    return module.eval(), [v for _, v in history], out


# ---------------------------------------------------------------------------------------- model
def test_config_validation_and_roundtrip():
    cfg = small_config(prediction="v")
    assert HypernetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.diffusers_prediction_type == "v_prediction"
    with pytest.raises(ModelError):
        HypernetConfig(prediction="score")
    with pytest.raises(ModelError):
        HypernetConfig.from_dict({**cfg.to_dict(), "unknown_field": 1})


def test_denoiser_shapes_and_null_condition():
    torch.manual_seed(0)
    net = Denoiser(small_config())
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
        cond_out, uncond_out = m.sampling_net(x, t, c), m.sampling_net(x, t, None)
        torch.testing.assert_close(m.guided_prediction(x, t, c, 1.0), cond_out, rtol=0, atol=0)
        # guidance != 1 runs both branches as one 2B batch; it must match the formula.
        torch.testing.assert_close(
            m.guided_prediction(x, t, c, 3.0), uncond_out + 3.0 * (cond_out - uncond_out), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_sample_shapes_seed_reproducibility(untrained, scheduler):
    _, c = toy_world(3, seed=7)
    kw = dict(num_steps=4, guidance=2.0, scheduler=scheduler)
    a = untrained.sample(c, seed=11, **kw)
    b = untrained.sample(c, seed=11, **kw)
    assert a.shape == (3, LATENT) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)  # bit-identical
    assert not torch.equal(a, untrained.sample(c, seed=12, **kw))
    gen_a = untrained.sample(c, generator=torch.Generator().manual_seed(3), **kw)
    gen_b = untrained.sample(c, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(gen_a, gen_b)
    many = untrained.sample(c, seed=11, n_samples=4, **kw)
    assert many.shape == (12, LATENT)
    assert not torch.equal(many[0], many[1])  # different noise per sample of one condition
    avg = untrained.sample(c, seed=11, n_samples=2, mean_of_samples=3, **kw)
    assert avg.shape == (6, LATENT)
    assert untrained.sample(c[0], seed=1, **kw).shape == (1, LATENT)  # a single 1-d embedding


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


def test_x0_clipping_keeps_prediction_kind():
    torch.manual_seed(0)
    z, c = toy_world(32)
    for kind in ("x0", "v", "eps"):
        m = HypernetDiffusion.for_data(z, c, small_config(prediction=kind, clip_sample=1.0), ema_decay=0)
        x, out = torch.randn(4, LATENT) * 3, torch.randn(4, LATENT) * 3
        t = 400
        a = m.noise_scheduler.alphas_cumprod[t]
        clipped = m._clip_output(out, x, t)
        x0 = {"x0": clipped, "eps": (x - (1 - a).sqrt() * clipped) / a.sqrt(),
              "v": a.sqrt() * x - (1 - a).sqrt() * clipped}[kind]
        assert x0.abs().max() <= 1.0 + 1e-4


# ---------------------------------------------------------------------------------------- export / load
def test_export_load_roundtrip_identical_samples(untrained, tmp_path):
    untrained.export(tmp_path, sampling={"guidance": 2.5})
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["config"]["latent_dim"] == LATENT and meta["sampling"]["guidance"] == 2.5
    loaded = HypernetDiffusion.load(tmp_path)
    assert loaded.sampling_defaults["guidance"] == 2.5
    for key in ("latent_mean", "latent_std", "cond_mean", "cond_scale"):
        assert torch.equal(getattr(loaded, key), getattr(untrained, key))
    _, c = toy_world(2, seed=3)
    for sched in ("ddim", "dpm"):
        kw = dict(num_steps=5, guidance=2.5, seed=4, scheduler=sched)
        assert torch.equal(loaded.sample(c, **kw), untrained.sample(c, **kw))
    assert torch.equal(loaded.sample(None, seed=2, num_steps=3), untrained.sample(None, seed=2, num_steps=3))


def test_load_errors(tmp_path, untrained):
    with pytest.raises(ModelError, match="no hypernetwork"):
        HypernetDiffusion.load(tmp_path)
    untrained.export(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ModelError):
        HypernetDiffusion.load(tmp_path)
    untrained.export(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["config"]["width"] = 64  # weights no longer match the config
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="does not match"):
        HypernetDiffusion.load(tmp_path)


# ---------------------------------------------------------------------------------------- behaviour
def test_training_loss_falls(trained):
    _, losses, out = trained
    assert len(losses) >= 350
    first, last = sum(losses[:30]) / 30, sum(losses[-50:]) / 50
    assert last < 0.6 * first, (first, last)
    assert (out / "loss_curve.png").is_file()


def test_trained_samples_beat_mean_random_and_nearest_entry(trained, tmp_path):
    module, _, _ = trained
    z_train, c_train = toy_world(1000, seed=0)
    z_test, c_test = toy_world(200, seed=99)  # held-out identities
    centre = z_train.mean(0)

    def mse(pred):
        return float((pred - z_test).pow(2).sum(1).mean())

    def centred_cos(pred):
        return float(torch.nn.functional.cosine_similarity(pred - centre, z_test - centre, dim=1).mean())

    sample = module.sample(c_test, seed=0, num_steps=10, guidance=1.5)
    random_entry = z_train[torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:200]]
    assert mse(sample) < 0.5 * mse(centre.expand(200, -1)), (mse(sample), mse(centre.expand(200, -1)))
    assert mse(sample) < 0.25 * mse(random_entry)
    assert centred_cos(sample) > 0.9
    # ... and the library entry with the most similar embedding (about 7.4 vs 13 when written).
    nearest = z_train[(c_test @ c_train.T).argmax(dim=1)]
    assert mse(sample) < 0.85 * mse(nearest), (mse(sample), mse(nearest))
    averaged = module.sample(c_test, seed=0, num_steps=10, guidance=1.5, mean_of_samples=4)
    assert mse(averaged) <= mse(sample) * 1.05
    # The exported model reproduces the trained one exactly.
    loaded = HypernetDiffusion.load(module.export(tmp_path))
    assert torch.equal(loaded.sample(c_test[:4], seed=1), module.sample(c_test[:4], seed=1))


def test_resume_from_lightning_checkpoint(trained):
    """fit(resume=True) restores weights, EMA and statistics from last.ckpt (weights_only) and trains on."""
    from lorasynth.training import TrainConfig, fit

    module, _, out = trained
    z, c = toy_world(1000, seed=0)
    cfg = TrainConfig(max_steps=410, batch_size=128, lr=2e-3, progress=False, seed=0, ckpt_every=1000)
    fresh = HypernetDiffusion(small_config(), lr=cfg.lr, warmup_steps=20)  # no stats: they come from the checkpoint
    trainer = fit(fresh, latent_dataloader(z, c, cfg.batch_size, seed=0), out, cfg, resume=True)
    assert trainer.global_step == 410
    assert int(fresh.ema_updates) == 410
    assert torch.equal(fresh.latent_mean, module.latent_mean) and torch.equal(fresh.cond_scale, module.cond_scale)
