#!/usr/bin/env python
"""Benchmark synthesis latency and model training throughput on the w2w layout; prints JSON.

* Warm synthesis latency, photo -> LoRA file, for the w2w layout (99,648 values) with a
  512-d latent, timed end to end and split into embedding (dlib, the astronaut photo) /
  sampling (hypernetwork, CFG) / decoding (VAE) / assembling (vector -> LoRA modules) /
  writing (kohya safetensors, atomic). Speed does not depend on weight
  values, so the VAE and hypernetwork have default configs and untrained weights.
* ``synthesize --average`` (the model's expected delta W, rank 32) on the w2w layout with the
  default PCA latent of 512, warm, against one sample of the same model: the PCA is fitted on the
  pack, the hypernetwork's mean and covariance come from the pack's latents (the residual
  covariance is half global, half local over 64 neighbours: both parts of the computation run).
  ``first_call_s`` includes the per-model global term (computed once per model and process);
  ``sigma_points_s`` is the route it replaced (2m decoded LoRAs, a rank-2m truncation per module),
  run once, with the relative delta-W distance between the two results.
* VAE and hypernetwork training throughput (items/s) and peak RSS (VmHWM of a child
  process) on an N-entry (default 20,000) w2w-shaped pack written from the planted world.

    python scripts/bench_synthesize.py --quick     # 2,000-entry pack, fewer repeats
    python scripts/bench_synthesize.py             # 20,000-entry pack (8 GB on disk)
    python scripts/bench_synthesize.py --quick --only latency,average   # skip the training rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_pack(path: Path, n: int) -> float:
    from lorasynth.core.layout import Layout
    from lorasynth.library.pack import PackWriter
    from lorasynth.worlds.planted import SyntheticWorldConfig, make_world

    t0 = time.perf_counter()
    world = make_world(SyntheticWorldConfig(n, Layout.w2w(), embed_dim=128, seed=0))
    with PackWriter(path, world.layout, n, 128, embedder="dlib") as w:
        for vectors, embeddings, ids in world.iter_batches(batch_size=256):
            w.add_batch(vectors, embeddings, ids)
    return time.perf_counter() - t0


def make_model(pack_dir: Path, model_dir: Path) -> None:
    """A model folder with default-config, untrained VAE (latent 512) and hypernetwork."""
    from lorasynth.training.hypernet import HypernetDiffusion
    from lorasynth.models.hypernet.model import HypernetConfig
    from lorasynth.training.latent import LoRAVAE, VAEConfig
    from lorasynth.library.pack import open_pack
    from lorasynth.models.model_folder import SynthesisModel

    pack = open_pack(pack_dir)
    model = SynthesisModel.create(model_dir, pack, heldout_frac=0.0)
    vae = LoRAVAE(VAEConfig(latent_dim=512), pack.dim, mean=pack.mean, scale=pack.scale,
                  layout_signature=pack.layout.signature)
    vae.eval().export(model.latent_dir)
    z, c = torch.randn(64, 512), torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
    HypernetDiffusion.for_data(z, c, HypernetConfig()).eval().export(model.hypernet_dir)
    model.info.latent_kind, model.info.has_hypernet = "vae", True
    model.save()


def bench_latency(model_dir: Path, repeats: int) -> dict:
    from PIL import Image
    from skimage import data

    from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesizer, write_synthesized

    tmp = Path(tempfile.mkdtemp())
    photo = tmp / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo)
    syn = Synthesizer(model_dir)
    syn.embed_photo(photo)  # warm: load dlib models
    syn.synthesize(np.ones(128, dtype=np.float32), SynthesisSettings())  # warm: load VAE + hypernet
    rows = []
    for i in range(repeats):
        # the user's path, timed end to end: photo -> embedding -> LoRA object -> file
        t0 = time.perf_counter()
        e, _ = syn.embed_photo(photo)
        t1 = time.perf_counter()
        result = syn.synthesize(e, SynthesisSettings(seed=i))[0]
        t2 = time.perf_counter()
        write_synthesized(result, tmp / "out.safetensors")
        t3 = time.perf_counter()
        parts = result.timings  # sampling and decoding as synthesize() measured them inside
        rows.append({"embedding_s": t1 - t0, "sampling_s": parts["sampling_s"], "decoding_s": parts["decoding_s"],
                     "assembling_s": (t2 - t1) - parts["sampling_s"] - parts["decoding_s"],
                     "writing_s": t3 - t2, "total_s": t3 - t0})
        assert result.vector.shape[0] == syn.layout.size
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    d = syn.hypernet.sampling_defaults
    return {"repeats": repeats, "median": med, "goal_total_s": 0.3, "meets_goal": med["total_s"] <= 0.3,
            "sampler": d, "vae_params": sum(p.numel() for p in syn.latent.parameters()),
            "hypernet_params": sum(p.numel() for p in syn.hypernet.net.parameters()),
            "file_mb": round((tmp / "out.safetensors").stat().st_size / 2**20, 3)}


def make_pca_model(pack_dir: Path, model_dir: Path, local_k: int = 64, shrink: float = 0.5) -> None:
    """A model folder with a PCA latent of 512 fitted on the pack and a hypernetwork whose mean and
    residual covariance (global + local, ``shrink``) come from the pack's latents (weights untrained:
    ``--average`` does not run the denoiser)."""
    from lorasynth.library.pack import open_pack
    from lorasynth.models.hypernet.model import HypernetConfig
    from lorasynth.models.latent import encode_rows
    from lorasynth.models.latent.pca import fit_pca
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.training.hypernet import HypernetDiffusion

    pack = open_pack(pack_dir)
    model = SynthesisModel.create(model_dir, pack, heldout_frac=0.0)
    rows = np.asarray(model.info.train_ids)
    pca = fit_pca(pack, min(512, len(rows) - 1), idx=rows)
    pca.export(model.latent_dir)
    z = encode_rows(pca, pack, rows)
    c = torch.from_numpy(pack.read_embeddings(rows)).float()
    h = HypernetDiffusion.for_data(z, c, HypernetConfig(local_covariance=False)).eval().hypernet()
    resid = h.normalize_latent(z) - h.conditional_mean(h.normalize_cond(c))
    h.cov_cond = torch.nn.functional.normalize(c, dim=1)
    h.cov_resid = resid.float()
    h.resid_cov.copy_(torch.cov(resid.double().T).float())
    h.cov_k.fill_(local_k)
    h.cov_tau.fill_(0.1)
    h.cov_shrink.fill_(shrink)
    h.export(model.hypernet_dir)
    model.info.latent_kind, model.info.has_hypernet = "pca", True
    model.save()


def bench_average(model_dir: Path, repeats: int, sigma_points: bool = True) -> dict:
    """Warm ``--average`` (rank 32) against one sample, on the PCA-512 w2w model."""
    from lorasynth.core.blending import blend
    from lorasynth.synthesis.expected import global_covariance_root
    from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesizer

    syn = Synthesizer(model_dir)
    e = syn.pack.read_embeddings(np.arange(min(repeats + 1, len(syn.pack))))
    syn.synthesize(e[0], SynthesisSettings())  # warm: load the PCA and the hypernetwork
    t0 = time.perf_counter()
    first = syn.synthesize(e[0], SynthesisSettings(average=True))[0]
    first_s = time.perf_counter() - t0
    avg, one = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        syn.synthesize(e[(i + 1) % len(e)], SynthesisSettings(average=True))
        avg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        syn.synthesize(e[(i + 1) % len(e)], SynthesisSettings(seed=i))
        one.append(time.perf_counter() - t0)
    out = {"repeats": repeats, "latent": "pca", "latent_dim": syn.latent.latent_dim,
           "global_root_columns": int(global_covariance_root(syn.hypernet).shape[1]),
           "local_k": int(syn.hypernet.cov_k), "shrink": float(syn.hypernet.cov_shrink),
           "first_call_s": first_s, "average_median_s": statistics.median(avg),
           "one_sample_median_s": statistics.median(one), "goal_average_s": 1.0, "goal_one_sample_s": 0.1,
           "average_rank": first.lora.metadata["lorasynth.average_rank"],
           "average_rank_error": first.lora.metadata["lorasynth.average_rank_error"],
           "expectation_tail": first.lora.metadata["lorasynth.expectation_tail"]}
    out["meets_goals"] = out["average_median_s"] <= 1.0 and out["one_sample_median_s"] <= 0.1
    if sigma_points:  # the route --average took before: 2m sigma points, decoded, truncated
        h = syn.hypernet
        t0 = time.perf_counter()
        z = h.expected_latents(torch.from_numpy(e[:1]).float())
        loras = [syn.layout.unflatten(torch.from_numpy(v)) for v in syn.decode(z)]
        ref, _ = blend(loras, [1.0 / len(loras)] * len(loras), rank=32)
        out["sigma_points_s"] = time.perf_counter() - t0
        out["sigma_points"] = len(loras)
        num = den = 0.0
        for name in syn.layout.names:
            a, b = first.lora.modules[name].delta(torch.float64), ref.modules[name].delta(torch.float64)
            num, den = num + float((a - b).square().sum()), den + float(b.square().sum())
        out["relative_distance_to_sigma_points"] = (num / den) ** 0.5
        out["speedup_vs_sigma_points"] = out["sigma_points_s"] / out["average_median_s"]
    return out


def child_train(part: str, pack_dir: str, steps: int) -> None:
    """Runs in a child process: train ``part`` for ``steps`` steps, print items/s and peak RSS."""
    import lightning

    from lorasynth.training.hypernet import HypernetDiffusion, latent_dataloader
    from lorasynth.models.hypernet.model import HypernetConfig
    from lorasynth.training.latent import VAEConfig, train_vae
    from lorasynth.library.pack import open_pack
    from lorasynth.training.lightning import TrainConfig, fit

    pack = open_pack(pack_dir)
    out = Path(tempfile.mkdtemp())
    if part == "vae":
        cfg = TrainConfig(max_steps=steps, batch_size=64, progress=False, ckpt_every=10**9)
        # one warm-up run so the timed one excludes first-call costs
        t0 = time.perf_counter()
        train_vae(pack, out, VAEConfig(latent_dim=512), cfg)
        dt = time.perf_counter() - t0
        items = steps * cfg.batch_size
    else:
        z = torch.randn(pack.n, 512)
        c = torch.from_numpy(pack.read_embeddings(np.arange(pack.n))).float()
        cfg = TrainConfig(max_steps=steps, batch_size=256, progress=False, ckpt_every=10**9)
        net = HypernetDiffusion.for_data(z, c, HypernetConfig())
        t0 = time.perf_counter()
        fit(net, latent_dataloader(z, c, batch_size=cfg.batch_size), out, cfg)
        dt = time.perf_counter() - t0
        items = steps * cfg.batch_size
    print(json.dumps({"part": part, "steps": steps, "seconds": dt, "items_per_s": items / dt,
                      "peak_rss_mb": peak_rss_mb()}))


def bench_training(pack_dir: Path, vae_steps: int, hyp_steps: int) -> dict:
    out = {}
    for part, steps in (("vae", vae_steps), ("hypernet", hyp_steps)):
        r = subprocess.run([sys.executable, __file__, "--child", part, str(pack_dir), str(steps)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode != 0 or not lines:
            out[part] = {"error": r.stderr[-2000:]}
        else:
            out[part] = json.loads(lines[-1])
    out["goal_peak_rss_mb"] = 4096
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--entries", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", default="latency,average,training",
                    help="comma-separated parts to run: latency, average, training")
    ap.add_argument("--no-sigma-points", action="store_true", help="skip the one run of the old --average route")
    ap.add_argument("--child", nargs=3, metavar=("PART", "PACK", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_train(args.child[0], args.child[1], int(args.child[2]))
        return
    n = args.entries or (2000 if args.quick else 20000)
    repeats = args.repeats or (5 if args.quick else 20)
    with tempfile.TemporaryDirectory(dir=os.environ.get("LORASYNTH_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        pack_s = write_pack(tmp / "pack", n)
        parts = set(args.only.split(","))
        result = {
            "benchmark": "synthesize",
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "load_average": os.getloadavg()},
            "layout": "w2w (64 modules, 99,648 values)", "latent_dim": 512,
            "pack": {"entries": n, "write_s": pack_s,
                     "gb": round(sum(f.stat().st_size for f in (tmp / "pack").iterdir()) / 2**30, 2)},
        }
        if "latency" in parts:
            make_model(tmp / "pack", tmp / "model")
            result["latency"] = bench_latency(tmp / "model", repeats)
        if "average" in parts:
            make_pca_model(tmp / "pack", tmp / "model_pca")
            result["average"] = bench_average(tmp / "model_pca", repeats, not args.no_sigma_points)
        if "training" in parts:
            result["training"] = bench_training(tmp / "pack", 20 if args.quick else 50, 50 if args.quick else 200)
        result["machine"]["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
