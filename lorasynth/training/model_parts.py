"""Train a synthesis model's parts: the latent model (VAE or PCA) and the hypernetwork.

Both read the memory-mapped pack (bounded RAM) and train with Lightning (see
:mod:`lorasynth.training.lightning`: checkpoint/resume, progress bar, loss-curve PNG, and
``devices``/``strategy``/``num_nodes`` passed straight to Lightning for DDP on GPUs).

Under DDP every rank runs these functions; only rank 0 exports and writes ``lorasynth_model.json``,
and every rank returns only after that (a barrier), so a command chained after this one
finds the files on any rank.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lorasynth.errors import ModelError
from lorasynth.models.latent import decode_rows, encode_rows
from lorasynth.models.model_folder import SynthesisModel
from lorasynth.training.lightning import TrainConfig, barrier, is_global_zero


def train_latent(model: SynthesisModel, kind: str = "pca", latent_dim: int = 512, train_cfg: TrainConfig | None = None,
                 vae_overrides: dict | None = None, resume: bool = False):
    """Fit the latent model on the model's training rows and export it to ``MODEL/latent``.

    A VAE is compared with PCA of the same size (what ``kind="pca"`` fits) on the validation people
    (returned as ``latent.comparison``). The default VAE (``arch="pca_residual"``) starts as that PCA and
    keeps its nonlinear residual only where it reconstructs the validation people better, so it is never
    below PCA there; ``pca`` stays the default kind (see README "Quality").
    """
    pack = model.open_pack()
    train_idx = np.asarray(model.info.train_ids)
    val = np.asarray(model.info.val_ids or model.info.heldout_ids or [], dtype=np.int64)
    from lorasynth.models.latent.pca import fit_pca

    k = min(latent_dim, len(train_idx) - 1, pack.dim)
    if kind == "pca":
        latent = fit_pca(pack, k, idx=train_idx)
    elif kind == "vae":
        from lorasynth.training.latent import VAEConfig, train_vae

        cfg = VAEConfig(**{"latent_dim": latent_dim, **(vae_overrides or {})})
        if cfg.arch == "pca_residual":  # equal size: the latent is the PCA's k
            cfg = dataclasses.replace(cfg, latent_dim=k)
        latent = train_vae(pack, model.train_dir("vae"), cfg, train_cfg or TrainConfig(), train_idx=train_idx,
                           val_idx=val if len(val) else None, resume=resume)
        if len(val):
            from lorasynth.models.latent import reconstruction_cosine

            pca = fit_pca(pack, k, idx=train_idx)  # the model `--kind pca` would fit
            latent.comparison = {
                "validation_rows": int(len(val)),
                "vae_reconstruction_delta_cosine": reconstruction_cosine(latent, pack, val, metric="delta"),
                "pca_reconstruction_delta_cosine": reconstruction_cosine(pca, pack, val, metric="delta"),
                "pca_latent_dim": k, "vae_latent_dim": latent.latent_dim, "arch": cfg.arch,
                "residual_used": (latent.selection or {}).get("residual_used"),
            }
    else:
        raise ModelError(f"unknown latent model kind {kind!r}; use vae or pca")
    model.info.latent_kind = kind
    model.info.has_hypernet = False  # a new latent space invalidates a hypernetwork trained on the old one
    if is_global_zero():
        latent.export(model.latent_dir)
        model.save()
    barrier()
    return latent


def delta_energy(latent, layout, max_rows: int = 200):
    """Energy scores in delta-W space for raw latents: ``f(samples (n, S, K), truth (n, K)) -> (n,)``.

    The hypernetwork's settings chosen on validation people (the residual model's neighbours, the
    sampler and its temperature) are scored by what the decoded LoRAs do to the weights
    (:func:`lorasynth.core.delta.delta_energy_scores`), on at most ``max_rows`` rows.
    """
    from lorasynth.core.delta import delta_energy_scores

    @torch.no_grad()
    def energy(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        samples, truth = samples[:max_rows], truth[:max_rows]
        n, s, k = samples.shape
        vs = decode_rows(latent, samples.reshape(n * s, k)).reshape(n, s, -1)
        return torch.from_numpy(delta_energy_scores(layout, vs, decode_rows(latent, truth)))

    return energy


def delta_cosines(latent, layout, max_rows: int = 400, chunk_bytes: int = 256 << 20):
    """Delta-W cosines among each face's raw latents: ``f(x (n, S, K)) -> (n, S, S)`` on at most
    ``max_rows`` faces (decoded by ``latent``, :func:`lorasynth.core.delta.delta_cosine_blocks`), a
    few faces at a time (about ``chunk_bytes`` of decoded vectors: a w2w LoRA is 99,648 values)."""
    from lorasynth.core.delta import delta_cosine_blocks

    @torch.no_grad()
    def cosines(x: torch.Tensor) -> torch.Tensor:
        x = x[:max_rows]
        n, s, k = x.shape
        step = max(1, chunk_bytes // (s * layout.size * 8))
        out = []
        for i in range(0, n, step):
            part = x[i : i + step]
            v = decode_rows(latent, part.reshape(-1, k))
            out.append(torch.from_numpy(delta_cosine_blocks(layout, v.reshape(len(part), s, -1))))
        return torch.cat(out) if out else torch.zeros(0, s, s, dtype=torch.float64)

    return cosines


def look_alike_spread_of(z: torch.Tensor, cond: torch.Tensor, val_z: torch.Tensor, val_cond: torch.Tensor, cosines,
                         k: int = 32, max_rows: int = 400) -> tuple[float, dict]:
    """:func:`~lorasynth.models.hypernet.regression.look_alike_spread` of validation faces and their ``k``
    nearest training faces (raw latents ``z`` / ``val_z``, raw conditions; ``cosines`` from
    :func:`delta_cosines`): the spread the sampler's draws for one face should have."""
    from lorasynth.models.hypernet.regression import look_alike_spread, top_neighbours, unit_rows

    vz, vc = val_z[:max_rows], val_cond[:max_rows]
    nb = top_neighbours(vc, cond, min(k, len(cond)))
    sims = (unit_rows(vc.float())[:, None] * unit_rows(cond.float())[nb]).sum(-1)
    cos = cosines(torch.cat([vz[:, None], z[nb]], dim=1))[:, 0, 1:]
    value, report = look_alike_spread(sims, cos)
    return value, {**report, "k": int(nb.shape[1]), "on": f"{len(vz)} validation faces and their {nb.shape[1]} "
                   "nearest training faces"}


def train_hypernet(model: SynthesisModel, train_cfg: TrainConfig | None = None, overrides: dict | None = None,
                   resume: bool = False, calibrate: bool = True, choose_default: bool | None = None):
    """Encode the rows with the latent model, fit the mean, train the residual diffusion, calibrate
    the sampler on the validation people, choose the default strategy and the blend's ``(k, τ)`` on
    them (:mod:`lorasynth.training.strategy_choice`; ``choose_default`` defaults to ``calibrate``),
    export. Returns the trained LightningModule; ``net.notes`` holds one line per thing the user
    should know (a calibration that fell back, a default strategy other than one sample)."""
    from lorasynth.training.hypernet import HypernetDiffusion, calibrate_sampling
    from lorasynth.models.hypernet.model import HypernetConfig
    from lorasynth.training.lightning import fit

    choose_default = calibrate if choose_default is None else choose_default
    pack = model.open_pack()
    if pack.embed_dim == 0:
        raise ModelError(f"pack {pack.path} has no face embeddings: the hypernetwork needs them as conditions")
    latent = model.load_latent()
    train_idx = np.asarray(model.info.train_ids)
    val_idx = np.asarray(model.info.val_ids, dtype=np.int64)
    z = encode_rows(latent, pack, train_idx)
    cond = torch.from_numpy(pack.read_embeddings(train_idx)).float()
    val = None
    if len(val_idx):
        val = (encode_rows(latent, pack, val_idx), torch.from_numpy(pack.read_embeddings(val_idx)).float())
    cfg = train_cfg or TrainConfig()
    from lorasynth.library.splits import person_key

    persons = {}
    groups = torch.tensor([persons.setdefault(person_key(pack.ids[int(r)]), len(persons)) for r in train_idx])
    energy = delta_energy(latent, pack.layout)
    net = HypernetDiffusion.for_data(z, cond, HypernetConfig(**(overrides or {})), val=val, seed=cfg.seed, lr=cfg.lr,
                                     groups=groups, energy=energy)
    batch = min(cfg.batch_size, len(z))
    loader = net.train_dataloader_for(batch, cfg.max_steps, cfg.seed)
    fit(net, loader, model.train_dir("hypernet"), cfg, resume=resume)
    net.eval()
    net.calibration, net.defaults, net.notes = {}, None, []  # notes: one line each, for `train hypernet` to print
    model.info.has_hypernet = True
    if is_global_zero():  # calibration and export on rank 0 alone; the others wait at the barrier
        hyper = net.hypernet()
        if calibrate and val is not None:
            cosines = delta_cosines(latent, pack.layout)
            spread = look_alike_spread_of(z, cond, val[0], val[1], cosines) if len(val[0]) >= 20 else None
            net.calibration = calibrate_sampling(hyper, val[0], val[1], seed=cfg.seed, energy=energy,
                                                 pairwise=cosines, spread=spread)
            fell_back = (net.calibration.get("achieved") or {}).get("fell_back")
            if fell_back:
                net.notes.append(f"temperature calibration fell back: {fell_back}")
        extra = {"mean": net.mean_report, "calibration": net.calibration, "covariance": net.cov_report,
                 "residual_pairs": net.pair_report}
        if choose_default and len(val_idx):
            from lorasynth.training.strategy_choice import choose_default_strategy

            net.defaults = choose_default_strategy(pack.layout, pack, latent, hyper, train_idx, val_idx, seed=cfg.seed)
            net.notes.extend(net.defaults["notes"])
            extra["defaults"] = net.defaults
        extra["notes"] = net.notes
        hyper.export(model.hypernet_dir, extra=extra)
        model.save()
    barrier()
    return net
