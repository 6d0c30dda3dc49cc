"""The mission's claim on a planted world of 2,000 identities (tiny layout, real training code).

Held-out ΔW cosine: diffusion and blend each beat nearest and the mean LoRA; diffusion beats
blend (the paper's claim); the VAE reconstructs held-out LoRAs with cosine >= 0.95.
``scripts/bench_quality.py`` runs the same on the w2w layout.
"""

import json

from lorasynth.evaluate import evaluate, save_report
from lorasynth.model_training import train_hypernet, train_latent
from lorasynth.pack import open_pack
from lorasynth.synthesis import Synthesizer
from lorasynth.synthesis_model import SynthesisModel
from lorasynth.synthetic import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack
from lorasynth.training import TrainConfig


def test_diffusion_and_blend_beat_nearest_and_mean_on_2000_identities(tmp_path):
    world = make_world(SyntheticWorldConfig(2000, tiny_layout(), embed_dim=128, seed=0))
    write_world_pack(world, tmp_path / "pack")
    model = SynthesisModel.create(tmp_path / "model", open_pack(tmp_path / "pack"), heldout_frac=0.1, seed=0)
    quiet = dict(progress=False, ckpt_every=10**9)
    train_latent(model, "vae", 64, TrainConfig(max_steps=300, batch_size=64, lr=2e-3, **quiet),
                 vae_overrides={"n_tokens": 16})
    train_hypernet(model, TrainConfig(max_steps=600, batch_size=256, lr=1e-3, **quiet), {"width": 256, "depth": 3})
    results = evaluate(Synthesizer(model.path))
    json_path, _ = save_report(results, tmp_path / "eval")
    cos = {k: v["delta_cosine_mean"] for k, v in json.loads(json_path.read_text())["strategies"].items()}
    print("held-out delta-W cosine:", cos, "VAE:", results["latent"])
    assert results["heldout"] == 200
    assert min(cos["diffusion"], cos["blend"]) > max(cos["nearest"], cos["mean_lora"])
    assert cos["diffusion"] > cos["blend"]
    assert results["latent"]["reconstruction_delta_cosine"] >= 0.95
