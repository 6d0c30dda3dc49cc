"""Small builders shared by tests (no fixtures here: import what you need)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from lorasynth.core.lora import LoRA, LoRAModule
from lorasynth.core.sd15 import sd15_module_shapes

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
TE = "text_encoder.text_model.encoder.layers.0"


def random_lora(names_shapes: dict[str, tuple[int, ...]], rank: int = 4, alpha: float = 8.0,
                seed: int = 0, dtype=torch.float32) -> LoRA:
    """A LoRA with random factors on the given weight shapes (Linear or Conv)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in names_shapes.items():
        out, rest = shape[0], tuple(shape[1:])
        up_tail = (1, 1) if len(rest) == 3 else ()
        down = torch.randn((rank, *rest), generator=g, dtype=torch.float64).to(dtype)
        up = torch.randn((out, rank, *up_tail), generator=g, dtype=torch.float64).to(dtype)
        modules[name] = LoRAModule(down, up, alpha)
    return LoRA(modules)


def sd15_lora(names: list[str], rank: int = 4, alpha: float = 8.0, seed: int = 0, dtype=torch.float32) -> LoRA:
    shapes = sd15_module_shapes()
    return random_lora({n: shapes[n] for n in names}, rank, alpha, seed, dtype)


def max_delta_diff(a: LoRA, b: LoRA) -> float:
    assert set(a.modules) == set(b.modules)
    return max((a.modules[n].delta(torch.float64) - b.modules[n].delta(torch.float64)).abs().max().item() for n in a.modules)


def build_tiny_model(root, identities: int, seed: int = 0, latent_dim: int = 16, steps: tuple[int, int] = (60, 80),
                     batch_size: int = 64, hypernet: dict | None = None):
    """A trained model folder ``root/model`` (VAE latent + hypernetwork) on a planted world in the tiny
    layout, its pack at ``root/pack``. The planted 128-d embeddings stand in for dlib's, so photos can
    be synthesized from too. ``steps``: (VAE, hypernetwork) training steps."""
    from pathlib import Path

    from lorasynth.training.model_parts import train_hypernet, train_latent
    from lorasynth.library.pack import PackWriter, open_pack
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout
    from lorasynth.training.lightning import TrainConfig

    root = Path(root)
    world = make_world(SyntheticWorldConfig(identities, tiny_layout(), embed_dim=128, seed=seed))
    with PackWriter(root / "pack", world.layout, world.n, 128, embedder="dlib") as writer:
        for vectors, embeddings, ids in world.iter_batches():
            writer.add_batch(vectors, embeddings, ids)
    model = SynthesisModel.create(root / "model", open_pack(root / "pack"), heldout_frac=0.1)
    quick = dict(batch_size=batch_size, progress=False, ckpt_every=10**9)
    train_latent(model, "vae", latent_dim=latent_dim, train_cfg=TrainConfig(max_steps=steps[0], lr=2e-3, **quick))
    train_hypernet(model, TrainConfig(max_steps=steps[1], lr=1e-3, **quick), hypernet or {"width": 64, "depth": 2})
    return root / "model"


def build_untrained_model(root, identities: int = 40, latent_dim: int = 6, cond_dim: int = 128):
    """A model folder ``root/model`` in seconds, without training: a PCA latent on a planted world in the
    tiny layout and an untrained hypernetwork (its pack at ``root/pack``). For tests of file handling
    and argument checks, not of quality."""
    from pathlib import Path

    from lorasynth.library.pack import PackWriter, open_pack
    from lorasynth.models.hypernet.model import Hypernet, HypernetConfig
    from lorasynth.models.latent.pca import fit_pca
    from lorasynth.models.model_folder import SynthesisModel
    from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout

    root = Path(root)
    world = make_world(SyntheticWorldConfig(identities, tiny_layout(), embed_dim=cond_dim, seed=0))
    with PackWriter(root / "pack", world.layout, world.n, cond_dim, embedder="dlib") as writer:
        for vectors, embeddings, ids in world.iter_batches():
            writer.add_batch(vectors, embeddings, ids)
    pack = open_pack(root / "pack")
    model = SynthesisModel.create(root / "model", pack, heldout_frac=0.1)
    fit_pca(pack, k=latent_dim).export(model.latent_dir)
    config = HypernetConfig(latent_dim=latent_dim, cond_dim=cond_dim, width=16, depth=1, mean_landmarks=4)
    Hypernet(config).export(model.hypernet_dir)
    model.info.latent_kind, model.info.has_hypernet = "pca", True
    model.save()
    return root / "model"


def make_kind(path: Path, kind: str) -> None:
    """Put a ``kind`` where a regular file is expected (an existing file or folder is replaced)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "unreadable":  # a regular file the process may not open (see `denied` in tests/fuzz/test_file_kinds.py: root reads anything)
        path.write_bytes(b"secret")
    else:
        raise AssertionError(kind)


def within(seconds: float, fn, hang: str | None = None):
    """Run ``fn`` in a thread and return its value (or raise its error); fail (instead of hanging the
    suite) if it is still running after ``seconds``, with the message ``hang``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), hang or f"still running after {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")
