"""Held-out evaluation of a synthesis model.

For every held-out identity of the model's pack: each strategy's LoRA is compared with the
true LoRA by the cosine and relative error of the concatenated ``delta W`` of all modules
(computed from factors, never forming ``delta W``), next to the mean-LoRA baseline. Also the
latent model's reconstruction cosine against PCA at equal latent size. Writes JSON and a
PNG chart. ``identity_similarity`` computes the paper's headline metric (face cosine
between images generated with a synthesized LoRA and the input face): meaningful only
with real SD1.5 weights; on the random-weight demo model it shows the mechanics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .formats.safe_io import atomic_write, write_text
from .layout import delta_inner
from .synthesis import SynthesisSettings, Synthesizer


def _scores(layout, pred_pred, pred_true, true_true) -> dict:
    cos = pred_true / np.sqrt(np.maximum(pred_pred * true_true, 1e-300))
    rel = np.sqrt(np.maximum(pred_pred + true_true - 2 * pred_true, 0) / np.maximum(true_true, 1e-300))
    return {"delta_cosine_mean": float(cos.mean()), "delta_cosine_median": float(np.median(cos)),
            "relative_error_mean": float(rel.mean()), "n": int(len(cos))}


def _train_mean(pack, rows, batch: int = 512) -> np.ndarray:
    total = np.zeros(pack.dim, dtype=np.float64)
    for i in range(0, len(rows), batch):
        total += pack.read_rows(rows[i : i + batch]).astype(np.float64).sum(axis=0)
    return (total / max(len(rows), 1)).astype(np.float32)


@torch.no_grad()
def evaluate(syn: Synthesizer, strategies=("diffusion", "blend", "nearest"), max_items: int | None = None,
             settings: SynthesisSettings | None = None, pca_baseline: bool = True) -> dict:
    """Held-out metrics per strategy (see module docstring)."""
    s = settings or SynthesisSettings()
    layout, pack = syn.layout, syn.pack
    test = np.asarray(syn.model.info.heldout_ids)
    if len(test) == 0:
        raise ValueError("the model has no held-out rows: train it with --holdout FRACTION to evaluate")
    if max_items:
        test = test[:max_items]
    truth = torch.from_numpy(pack.read_rows(test)).double()
    cond = pack.read_embeddings(test).astype(np.float32)
    cond /= np.maximum(np.linalg.norm(cond, axis=1, keepdims=True), 1e-12)
    tt = delta_inner(layout, truth, truth).numpy()
    results: dict = {"heldout": int(len(test)), "train": int(len(syn.train_rows)), "layout": layout.signature,
                     "embedder": syn.model.info.embedder, "strategies": {}}

    mean = torch.from_numpy(_train_mean(pack, syn.train_rows)).double()
    results["strategies"]["mean_lora"] = _scores(layout, delta_inner(layout, mean, mean).numpy(),
                                                 delta_inner(layout, mean, truth).numpy(), tt)
    if "nearest" in strategies or "blend" in strategies:
        rows, sims = syn.neighbours(cond, s.k)
    if "nearest" in strategies:
        pred = torch.from_numpy(pack.read_rows(rows[:, 0])).double()
        results["strategies"]["nearest"] = _scores(layout, delta_inner(layout, pred, pred).numpy(),
                                                   delta_inner(layout, pred, truth).numpy(), tt)
    if "blend" in strategies:
        weights = syn.blend_weights(sims, s.temperature)
        pp, pt = np.zeros(len(test)), np.zeros(len(test))
        for t in range(len(test)):  # exact: <sum w_i dW_i, dW_t> and |sum w_i dW_i|^2 from a Gram matrix
            nb = torch.from_numpy(pack.read_rows(rows[t])).double()
            k = len(nb)
            gram = delta_inner(layout, nb.repeat_interleave(k, 0), nb.repeat(k, 1)).numpy().reshape(k, k)
            pt[t] = weights[t] @ delta_inner(layout, nb, truth[t]).numpy()
            pp[t] = weights[t] @ gram @ weights[t]
        results["strategies"]["blend"] = _scores(layout, pp, pt, tt)
        results["blend_settings"] = {"k": s.k, "temperature": s.temperature}
    if "diffusion" in strategies:
        z = syn.diffusion_latents(cond, SynthesisSettings(guidance=s.guidance, steps=s.steps, seed=s.seed))
        pred = torch.from_numpy(syn.decode(z)).double()
        results["strategies"]["diffusion"] = _scores(layout, delta_inner(layout, pred, pred).numpy(),
                                                     delta_inner(layout, pred, truth).numpy(), tt)
        results["diffusion_settings"] = {"guidance": s.guidance if s.guidance is not None else syn.hypernet.sampling_defaults.get("guidance"),
                                         "steps": s.steps or syn.hypernet.sampling_defaults.get("num_steps"), "seed": s.seed}
    results["latent"] = latent_reconstruction(syn, test, pca_baseline)
    return results


@torch.no_grad()
def latent_reconstruction(syn: Synthesizer, test: np.ndarray, pca_baseline: bool = True) -> dict:
    """Reconstruction delta-cosine on held-out rows: the model's latent vs PCA of equal size."""
    from .latent import reconstruction_cosine

    out = {"kind": syn.model.info.latent_kind, "latent_dim": syn.latent.latent_dim,
           "reconstruction_delta_cosine": reconstruction_cosine(syn.latent, syn.pack, test, metric="delta")}
    if pca_baseline and syn.model.info.latent_kind != "pca":
        from .latent.pca import fit_pca

        k = min(syn.latent.latent_dim, len(syn.train_rows) - 1)
        pca = fit_pca(syn.pack, k, idx=syn.train_rows, exact_max_bytes=0)  # randomized: top-k only
        out["pca_reconstruction_delta_cosine"] = reconstruction_cosine(pca, syn.pack, test, metric="delta")
        out["pca_latent_dim"] = k
    return out


def save_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``eval.json`` and ``eval.png`` (bar chart of held-out delta-W cosine per strategy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_text(out / "eval.json", json.dumps(results, indent=2))
    names = list(results["strategies"])
    vals = [results["strategies"][n]["delta_cosine_mean"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bars = ax.bar(names, vals, color=["#999999" if n == "mean_lora" else "#3b75af" for n in names])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("held-out ΔW cosine")
    ax.set_title(f"{results['heldout']} held-out identities, layout {results['layout']}", fontsize=9)
    ax.set_ylim(min(0, min(vals)) * 1.1, 1.05)
    fig.tight_layout()
    png = atomic_write(out / "eval.png", lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return json_path, png


def identity_similarity(syn: Synthesizer, base: str, faces_dir: str | Path, strategies=("diffusion", "blend", "nearest"),
                        steps: int = 20, size: int = 512, prompt: str = "a photo of sks person", seed: int = 0) -> dict:
    """The paper's identity metric: embedder cosine between generated images and the input face."""
    from .apply import fused
    from .errors import FaceError
    from .faces import get_embedder
    from .pipeline import GenerationSettings, generate, load_pipeline

    pipe = load_pipeline(base)
    embedder = get_embedder(syn.model.info.embedder)
    photos = sorted(p for p in Path(faces_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    per: dict[str, list] = {s: [] for s in strategies}
    no_face: dict[str, int] = {s: 0 for s in strategies}
    settings = GenerationSettings(prompt=prompt, steps=steps, width=size, height=size, seed=seed)
    for photo in photos:
        e, _ = syn.embed_photo(photo)
        for strategy in strategies:
            result = syn.synthesize(e, SynthesisSettings(strategy=strategy, seed=seed))[0]
            with fused(pipe, [(result.lora, 1.0)]):
                image = np.asarray(generate(pipe, settings, progress=False))
            try:
                per[strategy].append(float(embedder.embed(image).embedding @ e))
            except FaceError:
                no_face[strategy] += 1
    return {"photos": len(photos), "base": base, "steps": steps, "size": size,
            "identity_cosine_mean": {s: (float(np.mean(v)) if v else None) for s, v in per.items()},
            "images_without_face": no_face}
