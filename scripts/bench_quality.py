#!/usr/bin/env python
"""Held-out quality on a planted world: diffusion vs blend vs nearest vs the mean LoRA; prints JSON.

Builds a planted-structure world (``lorasynth.synthetic``) of N identities on the chosen
layout, packs it, trains the LoRA-VAE and the hypernetwork on 90% of the identities with the
real training code, and runs ``lorasynth.evaluate`` on the held-out 10% (ΔW cosine and
relative error per strategy, VAE vs PCA reconstruction at equal latent size).

    python scripts/bench_quality.py --layout tiny --identities 2000
    python scripts/bench_quality.py --layout w2w --identities 2000 --latent-dim 512
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=["tiny", "w2w"], default="tiny")
    ap.add_argument("--identities", type=int, default=2000)
    ap.add_argument("--latent-dim", type=int, default=64)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-tokens", type=int, default=16)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--hypernet-steps", type=int, default=1500)
    ap.add_argument("--hypernet-width", type=int, default=256)
    ap.add_argument("--hypernet-depth", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="keep the model/eval here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lorasynth.evaluate import evaluate, save_report
    from lorasynth.layout import Layout
    from lorasynth.model_training import train_hypernet, train_latent
    from lorasynth.pack import PackWriter, open_pack
    from lorasynth.synthesis import Synthesizer
    from lorasynth.synthesis_model import SynthesisModel
    from lorasynth.synthetic import SyntheticWorldConfig, make_world, tiny_layout
    from lorasynth.training import TrainConfig

    layout = tiny_layout() if args.layout == "tiny" else Layout.w2w()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_quality_"))
    timings = {}
    t0 = time.perf_counter()
    world = make_world(SyntheticWorldConfig(args.identities, layout, embed_dim=128, seed=0))
    with PackWriter(root / "pack", layout, world.n, 128, embedder="synthetic", overwrite=True) as w:
        for vectors, embeddings, ids in world.iter_batches(batch_size=256):
            w.add_batch(vectors, embeddings, ids)
    timings["world_and_pack_s"] = time.perf_counter() - t0
    model = SynthesisModel.create(root / "model", open_pack(root / "pack"), heldout_frac=0.1, seed=0)
    quiet = dict(progress=False, ckpt_every=10**9)
    t0 = time.perf_counter()
    train_latent(model, "vae", args.latent_dim,
                 TrainConfig(max_steps=args.vae_steps, batch_size=args.vae_batch, lr=2e-3, **quiet),
                 vae_overrides={"n_tokens": args.vae_tokens})
    timings["vae_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_hypernet(model, TrainConfig(max_steps=args.hypernet_steps, batch_size=256, lr=1e-3, **quiet),
                   {"width": args.hypernet_width, "depth": args.hypernet_depth})
    timings["hypernet_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate(Synthesizer(model.path))
    timings["eval_s"] = time.perf_counter() - t0
    save_report(results, root / "eval")
    s = results["strategies"]
    results["summary"] = {
        "diffusion_minus_blend": s["diffusion"]["delta_cosine_mean"] - s["blend"]["delta_cosine_mean"],
        "diffusion_beats_nearest_and_mean": s["diffusion"]["delta_cosine_mean"] > max(
            s["nearest"]["delta_cosine_mean"], s["mean_lora"]["delta_cosine_mean"]),
        "blend_beats_nearest_and_mean": s["blend"]["delta_cosine_mean"] > max(
            s["nearest"]["delta_cosine_mean"], s["mean_lora"]["delta_cosine_mean"]),
        "vae_reconstruction_at_least_0.95": results["latent"]["reconstruction_delta_cosine"] >= 0.95,
    }
    results["config"] = vars(args)
    results["timings"] = timings
    results["output"] = str(root)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
