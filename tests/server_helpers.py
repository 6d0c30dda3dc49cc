"""A small world for the web app's tests and benchmark: tiny base model, library, trained model.

``build_server_world(root)`` makes, in about ten seconds on one core:

* ``base``: the tiny random-weight SD1.5-architecture pipeline (``lorasynth.worlds.tiny_sd``);
* ``library``: planted identities on the tiny UNet's attention layout, each with a 128-d
  embedding standing in for dlib's (so photos can be synthesized from);
* ``model``: the library packed, a LoRA-VAE and a hypernetwork trained for a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def build_server_world(root: str | Path, identities: int = 200, seed: int = 0) -> dict[str, Path]:
    from lorasynth.library import Library, NewEntry, pack_library
    from lorasynth.training.model_parts import train_hypernet, train_latent
    from lorasynth.library.pack import open_pack
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout
    from lorasynth.worlds.tiny_sd import build_sd_pipeline
    from lorasynth.training.lightning import TrainConfig

    root = Path(root)
    base = build_sd_pipeline(root / "base", "tiny", seed=seed)
    world = make_world(SyntheticWorldConfig(identities, tiny_layout(), embed_dim=128, seed=seed))
    lib = Library.create(root / "library", base_model=str(base), layout=world.layout, embedder="dlib")
    items = []
    for vectors, embeddings, ids in world.iter_batches(batch_size=256):
        for v, e, name in zip(vectors, embeddings, ids):
            # "Smiling": a yes/no attribute the web app can edit along (as CelebA's labels in w2w)
            attrs = {"trainer": "planted", "Smiling": bool(e[0] > 0)}
            items.append(NewEntry(world.layout.unflatten(torch.from_numpy(np.asarray(v))), f"planted-{name}",
                                  "synthetic", attrs, {"dlib": e}))
    lib.add_many(items)
    pack_library(lib, root / "model" / "pack", progress=False)
    lib.close()
    model = SynthesisModel.create(root / "model", open_pack(root / "model" / "pack"), heldout_frac=0.1, seed=seed)
    quick = dict(batch_size=64, progress=False, ckpt_every=10**9, seed=seed)
    train_latent(model, "vae", latent_dim=16, train_cfg=TrainConfig(max_steps=30, lr=2e-3, **quick))
    train_hypernet(model, TrainConfig(max_steps=30, lr=1e-3, **quick), {"width": 64, "depth": 2})
    return {"base": base, "library": root / "library", "model": root / "model"}


def shared_server_world(tmp_path_factory) -> dict[str, Path]:
    """:func:`build_server_world` built once per test run, shared by modules and xdist workers.

    xdist workers have their own ``basetemp`` under one common folder: the world goes there,
    built by whichever worker gets the lock first.
    """
    import fcntl
    import os

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "server_world"
    root.mkdir(parents=True, exist_ok=True)
    paths = {"base": root / "base", "library": root / "library", "model": root / "model"}
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            import shutil

            for part in paths.values():  # leftovers of a failed build
                shutil.rmtree(part, ignore_errors=True)
            build_server_world(root)
            (root / ".done").write_text("ok")
    return paths


def astronaut_png_bytes() -> bytes:
    """scikit-image's astronaut photo (one face) as PNG bytes."""
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def load_tiny_lora(path):
    """Read a LoRA made for the tiny UNet's layout (its shapes are not SD1.5's, so the reader
    needs that layout's module tree)."""
    from lorasynth.formats import load_lora
    from lorasynth.formats.keys import ModuleTree
    from lorasynth.worlds.planted import tiny_layout

    return load_lora(path, tree=ModuleTree.from_specs(tiny_layout().modules))
