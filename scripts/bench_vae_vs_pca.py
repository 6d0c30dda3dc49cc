#!/usr/bin/env python
"""The LoRA-VAE against PCA of the same latent size, on the world panel's worlds (JSON output).

For every world of a panel (``lorasynth/worlds/panels.json``): split its people into train /
validation / test (10 % each held out, as ``train latent``), fit PCA with ``k`` components on the
training rows, train the default LoRA-VAE (PCA linear path + nonlinear residual, best state on the
validation people) at the same ``k``, and report the ΔW-cosine reconstruction of both on the
validation people (what a design choice may use) and on the test people (only reported).

    python scripts/bench_vae_vs_pca.py --panel validation --max-persons 1000 --latent-dims 8,64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorasynth.library.pack import open_pack  # noqa: E402
from lorasynth.library.splits import split_by_person  # noqa: E402
from lorasynth.models.latent import reconstruction_cosine  # noqa: E402
from lorasynth.models.latent.pca import fit_pca  # noqa: E402
from lorasynth.training.latent import VAEConfig, train_vae  # noqa: E402
from lorasynth.training.lightning import TrainConfig  # noqa: E402
from lorasynth.worlds.panel import load_panel  # noqa: E402
from lorasynth.worlds.planted import make_world, write_world_pack  # noqa: E402


def run_world(spec, args, out: Path) -> dict:
    world = make_world(spec.config(min(spec.n_identities, args.max_persons)))
    pack = open_pack(write_world_pack(world, out / "pack"))
    train, val, test = (np.asarray(r, dtype=np.int64) for r in split_by_person(pack.ids, 0.1, 0.1, seed=args.seed))
    rows = {"spec": spec.to_dict(), "identities": min(spec.n_identities, args.max_persons), "dim": pack.dim,
            "rows": {"train": len(train), "validation": len(val), "test": len(test)}}
    for k in args.latent_dims:
        t0 = time.perf_counter()
        pca = fit_pca(pack, min(k, len(train) - 1), idx=train)
        cfg = TrainConfig(max_steps=args.steps, batch_size=128, lr=args.lr, progress=False, seed=args.seed,
                          ckpt_every=10**9)
        vae = train_vae(pack, out / f"vae{k}", VAEConfig(latent_dim=pca.latent_dim), cfg, train_idx=train, val_idx=val)
        res = {}
        for split, idx in (("validation", val), ("test", test)):
            res[split] = {"vae": round(reconstruction_cosine(vae, pack, idx, metric="delta"), 5),
                          "pca": round(reconstruction_cosine(pca, pack, idx, metric="delta"), 5)}
            res[split]["vae_minus_pca"] = round(res[split]["vae"] - res[split]["pca"], 5)
        res["residual_used"] = vae.selection["residual_used"]
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rows[f"k={pca.latent_dim}"] = res
        print(json.dumps({spec.name: {f"k={pca.latent_dim}": res}}), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panel", choices=("validation", "heldout"), default="validation")
    ap.add_argument("--panel-worlds", default="", help="only these worlds (comma-separated names)")
    ap.add_argument("--max-persons", type=int, default=1000, help="cap a world's identities")
    ap.add_argument("--latent-dims", default="8,64", help="comma-separated latent sizes")
    ap.add_argument("--steps", type=int, default=1500, help="VAE training steps (batch 128)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    args.latent_dims = [int(k) for k in args.latent_dims.split(",") if k.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {w.strip() for w in args.panel_worlds.split(",") if w.strip()}
    out = {}
    with tempfile.TemporaryDirectory(prefix="vae_vs_pca_") as tmp:
        for spec in load_panel(args.panel):
            if not only or spec.name in only:
                out[spec.name] = run_world(spec, args, Path(tmp) / spec.name)
    worse = [(w, k) for w, r in out.items() for k, v in r.items()
             if k.startswith("k=") and v["test"]["vae_minus_pca"] < -1e-6]
    print(json.dumps({"config": vars(args), "worlds": out, "vae_below_pca_on_test": worse}, indent=2))


if __name__ == "__main__":
    main()
