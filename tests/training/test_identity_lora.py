"""Identity LoRA training (DreamBooth + peft + Lightning) on the tiny SD1.5 pipeline.

Photos: scikit-image's public-domain astronaut, written to tmp at test time (never committed);
the second "person" is a mirrored crop of it. Runs are a few steps at 32 px: they check the
mechanics (loss falls, exact extraction, library entries, sharding), not LoRA quality.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from lorasynth.runtime.apply import fused, pipeline_tree
from lorasynth.errors import LayoutError, LorasynthError
from lorasynth.core.layout import W2W_TARGETS, Layout
from lorasynth.library import Library
from lorasynth.core.lora import LoRA
from lorasynth.training.identity_lora import (
    IdentityTrainConfig,
    diffusion_loss,
    encode_photos,
    encode_prompt,
    extract_lora,
    identity_layout,
    inject_lora,
    parse_shard,
    remove_lora,
    shard_of,
    target_modules,
    train_identities,
    train_identity_lora,
)

RES = 32


def fast_cfg(**kw) -> IdentityTrainConfig:
    base = dict(steps=2, lr=3e-2, resolution=RES, progress=False, log_every=1, ckpt_every=10**6)
    return IdentityTrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny UNet gains nothing from threads, and on a busy 2-core box two threads spin-wait
    on each other (measured: 40 steps take 57 s with 2 threads vs 3.6 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """``root/alice/astronaut.jpg`` and ``root/bob/mirrored_crop.jpg`` (+ a hidden folder to ignore)."""
    from skimage import data

    img = data.astronaut()
    root = tmp_path_factory.mktemp("identities")
    (root / "alice").mkdir()
    Image.fromarray(img).save(root / "alice" / "astronaut.jpg", quality=95)
    (root / "bob").mkdir()
    Image.fromarray(np.ascontiguousarray(img[20:320, 60:360][:, ::-1])).save(root / "bob" / "crop.jpg", quality=95)
    (root / ".cache").mkdir()
    return root


def _unet_out(pipe, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, RES // 8, RES // 8, generator=g)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def test_config_and_shard_validation():
    with pytest.raises(LorasynthError, match="multiple of 8"):
        IdentityTrainConfig(resolution=100)
    with pytest.raises(LorasynthError, match="rank"):
        IdentityTrainConfig(rank=0)
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0/1 ") == (0, 1)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0", "1/2/3", ""):
        with pytest.raises(LorasynthError, match="shard"):
            parse_shard(bad)
    assert shard_of(list("abcde"), (0, 2)) == ["a", "c", "e"] and shard_of(list("abcde"), (1, 2)) == ["b", "d"]


def test_default_recipe_on_sd15_gives_the_w2w_layout():
    """rank 1, to_q/to_v on the real SD1.5 UNet (built on the meta device) = the w2w layout."""
    import types

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    layout = identity_layout(types.SimpleNamespace(unet=unet), IdentityTrainConfig())
    assert layout.signature == Layout.w2w().signature and layout.size == 99_648


def test_extracted_lora_fused_equals_peft_adapter(tiny_pipeline):
    """peft's forward with the adapter == base UNet with the extracted LoRA fused: names, A/B, alpha."""
    pipe = tiny_pipeline
    cfg = fast_cfg()
    paths = target_modules(pipe, cfg)["unet"]
    before = _unet_out(pipe)
    tuner = inject_lora(pipe.unet, paths, cfg.rank, cfg.alpha, seed=0)
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # peft starts B at zero: give it a non-trivial update
            for name, p in pipe.unet.named_parameters():
                if ".lora_B." in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        with_peft = _unet_out(pipe)
        lora = LoRA(extract_lora(pipe.unet, "unet"))
    finally:
        remove_lora(tuner)
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())
    torch.testing.assert_close(_unet_out(pipe), before, rtol=0, atol=0)  # adapter fully removed
    assert (with_peft - before).abs().max() > 1e-3  # the update is visible
    with fused(pipe, [(lora, 1.0)]):
        torch.testing.assert_close(_unet_out(pipe), with_peft, rtol=0, atol=1e-5)


def test_training_lowers_loss_and_gives_the_w2w_shaped_lora(tiny_pipeline, identities):
    from diffusers import DDPMScheduler

    pipe = tiny_pipeline
    photo = identities / "alice" / "astronaut.jpg"
    cfg = fast_cfg(steps=40, seed=1)
    before = _unet_out(pipe)
    # a fixed batch: 16 (noise, timestep) draws on the photo's latent
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    mean, _ = encode_photos(pipe.vae, [photo], RES)
    text = encode_prompt(pipe, cfg.prompt).expand(16, -1, -1)
    g = torch.Generator().manual_seed(123)
    lat = mean.expand(16, -1, -1, -1)
    noise, t = torch.randn(lat.shape, generator=g), torch.randint(0, 1000, (16,), generator=g)
    with torch.no_grad():
        loss_before = diffusion_loss(pipe.unet, sched, lat, text, noise, t).item()

    lora, metrics = train_identity_lora(pipe, [photo], cfg)

    with fused(pipe, [(lora, 1.0)]), torch.no_grad():
        loss_after = diffusion_loss(pipe.unet, sched, lat, text, noise, t).item()
    assert loss_after < 0.97 * loss_before, (loss_before, loss_after)
    assert metrics.steps == 40 and len(metrics.losses) == 40 and metrics.photos == 1
    assert np.isfinite([metrics.initial_loss, metrics.final_loss]).all() and metrics.seconds_per_step > 0

    # exactly attn1/attn2 to_q/to_v, rank 1, alpha 27, in the layout of the pipeline's tree
    layout = Layout.for_targets(pipeline_tree(pipe).shapes, W2W_TARGETS, 1)
    layout.check(lora)
    assert set(lora.modules) == set(layout.names) and len(lora) == 16
    assert all(n.startswith("unet.") and n.rsplit(".", 2)[-2] in ("attn1", "attn2") for n in lora.modules)
    assert lora.ranks == {1} and {m.alpha for m in lora.modules.values()} == {27.0}
    assert all(m.up.abs().max() > 0 and m.down.abs().max() > 0 for m in lora.modules.values())

    # the pipeline is left as it was
    assert not any("lora" in n for n, _ in pipe.unet.named_modules()) and not pipe.unet.training
    torch.testing.assert_close(_unet_out(pipe), before, rtol=0, atol=0)


def _parser():
    from lorasynth.apps.cli import library as library_cli
    from lorasynth.apps.cli import library_train

    parser = argparse.ArgumentParser(prog="lorasynth")
    sub = parser.add_subparsers(dest="command")
    library_cli.register(sub)
    library_train.register(sub)
    return parser


def test_train_identities_shards_resume_and_cli(tiny_pipeline_dir, tiny_pipeline, identities, tmp_path, capsys):
    layout = Layout.for_targets(pipeline_tree(tiny_pipeline).shapes, W2W_TARGETS, 1)
    with Library.create(tmp_path / "lib", str(tiny_pipeline_dir), layout, embedder="dlib") as lib:
        report = train_identities(lib, identities, tiny_pipeline, fast_cfg(), shard=(0, 2), progress=False)
        assert report.ok and report.identities == 1 and [t["name"] for t in report.trained] == ["alice"]
        assert [e.name for e in lib.list()] == ["alice"]

    # shard 1/2 through the CLI (base model = the library's); bad shard strings fail clearly
    parser = _parser()
    args = parser.parse_args(["library", "train", str(tmp_path / "lib"), "--identities", str(identities),
                              "--steps", "2", "--resolution", str(RES), "--shard", "1/2", "--lr", "0.03"])
    assert args.func(args) == 0
    assert "trained bob" in capsys.readouterr().out
    for bad in ("2/2", "1-2"):
        args = parser.parse_args(["library", "train", str(tmp_path / "lib"), "--identities", str(identities),
                                  "--shard", bad])
        with pytest.raises(LorasynthError, match="shard"):
            args.func(args)

    with Library.open(tmp_path / "lib") as lib:
        entries = {e.name: e for e in lib.list()}
        assert set(entries) == {"alice", "bob"}
        for name, e in entries.items():
            assert e.source == f"train:{name}" and e.rank == 1 and e.alpha == 27.0
            assert e.attributes["steps"] == 2 and np.isfinite(e.attributes["final_loss"])
            vec = lib.entry_embeddings(e.id)["dlib"]
            assert vec.shape == (128,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        ids, mat = lib.embeddings("dlib")
        assert float(mat[0] @ mat[1]) > 0.9  # same face (mirrored crop): close embeddings
        # a re-run resumes: everything is there already, nothing is trained
        again = train_identities(lib, identities, tiny_pipeline, fast_cfg(), progress=False)
        assert again.trained == [] and sorted(again.skipped) == ["alice", "bob"]


def test_layout_mismatch_fails_before_training(tiny_pipeline, identities, tmp_path):
    with Library.create(tmp_path / "lib", "sd15", Layout.w2w(), embedder=None) as lib:
        with pytest.raises(LayoutError, match="layout"):
            train_identities(lib, identities, tiny_pipeline, fast_cfg(), progress=False)
        assert len(lib.list()) == 0
