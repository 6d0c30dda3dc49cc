"""Train a synthesis model's parts: the latent model (VAE or PCA) and the hypernetwork.

Both read the memory-mapped pack (bounded RAM) and train with Lightning (see
:mod:`lorasynth.training`: checkpoint/resume, progress bar, loss-curve PNG, and
``devices``/``strategy``/``num_nodes`` passed straight to Lightning for DDP on GPUs).

Under DDP every rank runs these functions; only rank 0 exports and writes ``lorasynth_model.json``,
and every rank returns only after that (a barrier), so a command chained after this one
finds the files on any rank.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .errors import ModelError
from .synthesis_model import SynthesisModel
from .training import TrainConfig, barrier, is_global_zero


@torch.no_grad()
def encode_rows(latent, pack, idx, batch_size: int = 256) -> torch.Tensor:
    """Latent codes (VAE means / PCA coefficients) of pack rows ``idx``, streamed in batches."""
    if hasattr(latent, "eval"):
        latent.eval()
    out = []
    idx = np.asarray(idx)
    for start in range(0, len(idx), batch_size):
        raw = pack.read_rows(idx[start : start + batch_size])
        out.append(latent.encode(latent.standardize(raw)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, latent.latent_dim)


def train_latent(model: SynthesisModel, kind: str = "vae", latent_dim: int = 512, train_cfg: TrainConfig | None = None,
                 vae_overrides: dict | None = None, resume: bool = False):
    """Fit the latent model on the model's training rows and export it to ``MODEL/latent``."""
    pack = model.open_pack()
    train_idx = np.asarray(model.info.train_ids)
    if kind == "pca":
        from .latent.pca import fit_pca

        k = min(latent_dim, len(train_idx) - 1, pack.dim)
        latent = fit_pca(pack, k, idx=train_idx)
    elif kind == "vae":
        from .latent.vae import VAEConfig, train_vae

        cfg = VAEConfig(latent_dim=latent_dim, **(vae_overrides or {}))
        val = np.asarray(model.info.heldout_ids) if model.info.heldout_ids else None
        latent = train_vae(pack, model.train_dir("vae"), cfg, train_cfg or TrainConfig(), train_idx=train_idx,
                           val_idx=val, resume=resume)
    else:
        raise ModelError(f"unknown latent model kind {kind!r}; use vae or pca")
    model.info.latent_kind = kind
    model.info.has_hypernet = False  # a new latent space invalidates a hypernetwork trained on the old one
    if is_global_zero():
        latent.export(model.latent_dir)
        model.save()
    barrier()
    return latent


def train_hypernet(model: SynthesisModel, train_cfg: TrainConfig | None = None, overrides: dict | None = None,
                   resume: bool = False):
    """Encode the training rows with the latent model, train the conditional diffusion, export it."""
    from torch.utils.data import DataLoader, TensorDataset

    from .hypernet.diffusion import HypernetDiffusion
    from .hypernet.model import HypernetConfig
    from .training import fit, long_epoch_sampler

    pack = model.open_pack()
    if pack.embed_dim == 0:
        raise ModelError(f"pack {pack.path} has no face embeddings: the hypernetwork needs them as conditions")
    latent = model.load_latent()
    train_idx = np.asarray(model.info.train_ids)
    z = encode_rows(latent, pack, train_idx)
    cond = torch.from_numpy(pack.read_embeddings(train_idx)).float()
    cfg = train_cfg or TrainConfig()
    net = HypernetDiffusion.for_data(z, cond, HypernetConfig(**(overrides or {})), lr=cfg.lr)
    batch = min(cfg.batch_size, len(z))
    loader = DataLoader(TensorDataset(z, cond), batch_size=batch, drop_last=True,
                        sampler=long_epoch_sampler(len(z), dataclasses.replace(cfg, batch_size=batch)))
    fit(net, loader, model.train_dir("hypernet"), cfg, resume=resume)
    net.eval()
    model.info.has_hypernet = True
    if is_global_zero():
        net.export(model.hypernet_dir)
        model.save()
    barrier()
    return net
