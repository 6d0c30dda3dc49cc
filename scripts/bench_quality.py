#!/usr/bin/env python
"""Held-out quality on the grid of hard planted worlds; prints JSON (world x strategy).

For every world of ``lorasynth.worlds.planted.QUALITY_GRID`` (or ``--worlds``): build it, pack it,
split it by person into train / validation / test, fit the latent model (PCA by default) and
train the hypernetwork with the real training code, then ``lorasynth.synthesis.evaluation.evaluate`` on the
test people with the world's oracle: held-out delta-W cosine of mean delta W, nearest, blend
(default and tuned on validation), kernel ridge regression, one diffusion sample, the mean of N
samples, the average (the model's expected delta W, ``synthesize --average``), the oracle's one
sample / mean of N, the pairwise spread of samples vs the oracle's, the
memorization check and the latent reconstruction vs PCA. ``targets`` says which of the issue's
targets hold.

    python scripts/bench_quality.py                              # the tiny worlds, 2,000 persons
    python scripts/bench_quality.py --worlds w2w-vis60 --persons 1000
    python scripts/bench_quality.py --panel validation --max-persons 1000   # the world panel (both: --panel both)

``--panel``: the randomized worlds of ``lorasynth/worlds/panels.json`` (a validation panel to tune on,
a held-out panel only reported; :mod:`lorasynth.worlds.panel`), each scored against its best
reference (the exact oracle, or the closed-form kernel ridge in delta-W space and its square), with
the model's default strategy and the calibration's achieved spread.
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


def _config_value(kv: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set`` -> (key, JSON value, or the string itself)."""
    key, _, value = kv.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def run_world(name: str, args, root: Path, spec=None) -> dict:
    from lorasynth.synthesis.evaluation import evaluate
    from lorasynth.training.model_parts import train_hypernet, train_latent
    from lorasynth.library.pack import open_pack
    from lorasynth.synthesis.synthesizer import Synthesizer
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.worlds.planted import QUALITY_GRID, hard_world_config, make_world, write_world_pack
    from lorasynth.training.lightning import TrainConfig

    timings = {}
    t0 = time.perf_counter()
    world = make_world(spec.config(min(spec.n_identities, args.max_persons)) if spec is not None else
                       hard_world_config(args.persons, **QUALITY_GRID[name], seed=args.seed))
    write_world_pack(world, root / "pack", overwrite=True)
    timings["world_and_pack_s"] = time.perf_counter() - t0
    model = SynthesisModel.create(root / "model", open_pack(root / "pack"), heldout_frac=0.1, seed=args.seed, val_frac=0.1)
    quiet = dict(progress=False, ckpt_every=10**9, seed=args.seed)
    t0 = time.perf_counter()
    vae_vs_pca = None
    if args.vae_steps:
        vae = train_latent(model, "vae", args.latent_dim, TrainConfig(max_steps=args.vae_steps, batch_size=64, lr=2e-3, **quiet),
                           vae_overrides={"n_tokens": 16})
        vae_vs_pca = getattr(vae, "comparison", None)
        timings["vae_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    train_latent(model, "pca", args.latent_dim)
    timings["latent_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    net = train_hypernet(model, TrainConfig(max_steps=args.hypernet_steps, batch_size=256, lr=2e-3, **quiet),
                         {"width": args.hypernet_width, "depth": args.hypernet_depth, "pair_neighbours": args.pair_neighbours,
                          **dict(_config_value(kv) for kv in args.set)})
    timings["hypernet_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(Synthesizer(model.path), n_samples=args.samples, oracle=lambda rows, n: world.oracle_vectors(rows, n),
                   max_items=args.eval_rows or None, split=args.split)
    timings["eval_s"] = time.perf_counter() - t0
    s = {k: v["delta_cosine_mean"] for k, v in res["strategies"].items()}
    oracle, spread = res["oracle"], res["samples"]
    regression = max(s["regression"], s.get("blend_tuned", -1.0))
    out = {
        "split": {"train": res["train"], "validation": res["validation"], "test": res["heldout"], "scored": res["split"]},
        "held_out_delta_cosine": s,
        "oracle": {"one_sample": oracle["one_sample"], "mean_of_n": oracle["mean_of_n"]},
        "pairwise_cosine": {"samples": spread["pairwise_cosine"], "oracle": spread["oracle_pairwise_cosine"],
                            "gap": spread["spread_gap"]},
        "memorization": res["memorization"],
        "latent": res["latent"], "vae_vs_pca_validation": vae_vs_pca,
        "settings": {"blend_tuned": res.get("blend_tuned_settings"), "regression": res.get("regression_settings"),
                     "sampler": res["diffusion_settings"], "hypernet_calibration": getattr(net, "calibration", {}).get("chosen"),
                     "residual_pairs_k": (net.pair_report or {}).get("k"),
                     "covariance": {k: v for k, v in (net.cov_report or {}).items() if k in ("k", "tau", "shrink")}},
        "targets": {
            "average_ge_regression": s["diffusion_expected"] >= s["regression"],
            "average_ge_best_of_regression_and_tuned_blend": s["diffusion_expected"] >= regression,
            "mean_of_n_ge_best_of_regression_and_tuned_blend": s["diffusion_mean"] >= regression,
            "one_sample_ge_0.9_oracle": s["diffusion"] >= 0.9 * oracle["one_sample"],
            "spread_within_0.05_of_oracle": abs(spread["spread_gap"]) <= 0.05,
            "no_memorization": not res["memorization"]["memorizes"],
            "latent_ge_pca": res["latent"]["reconstruction_delta_cosine"] >= res["latent"]["pca_reconstruction_delta_cosine"] - 1e-9,
        },
        "one_sample_over_oracle": s["diffusion"] / oracle["one_sample"],
        "default_strategy": res.get("default_strategy"), "notes": getattr(net, "notes", []),
        "calibration_achieved": (getattr(net, "calibration", {}) or {}).get("achieved"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    return out


def main() -> None:
    from lorasynth.worlds.planted import QUALITY_GRID

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default=",".join(k for k in QUALITY_GRID if k.startswith("tiny")),
                    help=f"comma-separated, from {', '.join(QUALITY_GRID)}")
    ap.add_argument("--persons", type=int, default=2000, help="persons per world (2 LoRAs each)")
    ap.add_argument("--latent-dim", type=int, default=64)
    ap.add_argument("--hypernet-steps", type=int, default=2000, help="as `lorasynth train hypernet`")
    ap.add_argument("--hypernet-width", type=int, default=256)
    ap.add_argument("--hypernet-depth", type=int, default=2)
    ap.add_argument("--pair-neighbours", type=int, default=0, help="residual model's neighbours per face (0: chosen on validation)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another HypernetConfig field, e.g. --set mean_condition=true (repeatable)")
    ap.add_argument("--vae-steps", type=int, default=0, help="also train a VAE and compare it with PCA (0: skip)")
    ap.add_argument("--samples", type=int, default=16, help="N of the mean-of-N mode")
    ap.add_argument("--eval-rows", type=int, default=0, help="score at most this many test rows (0: all)")
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="score the test people (the final number) or the validation people (to compare designs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--panel", choices=("validation", "heldout", "both"), default=None,
                    help="run the world panel(s) of lorasynth/worlds/panels.json instead of --worlds")
    ap.add_argument("--panel-worlds", default="", help="only these panel worlds (comma-separated names)")
    ap.add_argument("--max-persons", type=int, default=20000, help="cap a panel world's identities (a quicker run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="keep the packs/models here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_quality_"))
    if args.panel:
        print(json.dumps(run_panels(args, root), indent=2))
        return
    grid = {}
    for name in [w.strip() for w in args.worlds.split(",") if w.strip()]:
        grid[name] = run_world(name, args, root / name)
        print(json.dumps({name: grid[name]["held_out_delta_cosine"]}), file=sys.stderr, flush=True)
    print(json.dumps({"config": vars(args), "grid": grid, "output": str(root)}, indent=2))


def run_panels(args, root: Path) -> dict:
    """Every world of the chosen panel(s): the grid row, the world's reference and the targets against it."""
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.worlds.panel import load_panel, reference_scores
    from lorasynth.worlds.planted import make_world

    only = {w.strip() for w in args.panel_worlds.split(",") if w.strip()}
    out = {}
    for which in (("validation", "heldout") if args.panel == "both" else (args.panel,)):
        rows = {}
        for spec in load_panel(which):
            if only and spec.name not in only:
                continue
            row = run_world(spec.name, args, root / spec.name, spec)
            model = SynthesisModel.open(root / spec.name / "model")
            world = make_world(spec.config(min(spec.n_identities, args.max_persons)))
            test = list(model.info.heldout_ids)[: args.eval_rows or None]
            ref = reference_scores(world, list(model.info.train_ids), list(model.info.val_ids), test)
            s = row["held_out_delta_cosine"]
            row["spec"] = spec.to_dict()
            row["reference"] = {k: v for k, v in ref.items() if k != "oracle"}
            row["panel_targets"] = {
                "one_sample_ge_nearest": s["diffusion"] >= s["nearest"],
                "one_sample_ge_0.9_reference": s["diffusion"] >= 0.9 * ref["one_sample"],
                "average_ge_kernel_ridge_minus_0.01": s["diffusion_expected"] >= s["regression"] - 0.01,
                "spread_within_0.05_or_says_so": bool((row["calibration_achieved"] or {}).get("target_reached"))
                or bool((row["calibration_achieved"] or {}).get("fell_back")),
            }
            rows[spec.name] = row
            print(json.dumps({spec.name: {"held_out": s, "reference": row["reference"]["one_sample"],
                                          "default": row["default_strategy"]}}), file=sys.stderr, flush=True)
        out[which] = rows
    return {"config": vars(args), "panels": out, "output": str(root)}


if __name__ == "__main__":
    main()
