"""The model's default strategy, chosen on validation people: never worse than the simple baselines.

``train hypernet`` scores four ways of answering a face on the validation people (ΔW cosine of
the synthesized LoRA to the person's real LoRA, from the pack's rows, not the latent's copy):

* ``diffusion``: one sample (the expected score of one draw: the mean over ``samples`` draws);
* ``average``: the model's expected ΔW (``synthesize --average``, :meth:`Hypernet.expected_latents`);
* ``nearest``: the training LoRA of the most similar face;
* ``blend``: softmax(cos / τ) over the ``k`` most similar training faces, exact ΔW blend, with
  ``(k, τ)`` chosen on these validation people (:func:`tune_blend`).

When one sample scores below nearest, or the average below the blend, the model's default
strategy becomes the best of the four (``defaults.strategy`` in ``hypernet.json``), and a one-line
note says why; otherwise the default stays one sample. The user can still ask for any strategy.
The blend's ``(k, τ)`` are stored too: the CLI's and the API's blend use them by default.
"""

from __future__ import annotations

import numpy as np
import torch

from lorasynth.core.delta import delta_gram, delta_inner
from lorasynth.models.hypernet.regression import cosine_top_k, softmax_weights, unit_rows
from lorasynth.models.latent import decode_rows

#: Settings tried when the blend is tuned on validation people.
BLEND_K = (1, 2, 4, 8, 16, 32, 64)
BLEND_TEMPERATURE = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
#: Strategies a model may default to (``average`` = diffusion with ``--average``).
DEFAULT_STRATEGIES = ("diffusion", "average", "blend", "nearest")


def _cosines(pt: np.ndarray, pp: np.ndarray, tt: np.ndarray) -> np.ndarray:
    return pt / np.sqrt(np.maximum(pp * tt, 1e-300))


def neighbour_table(layout, pack, train_rows: np.ndarray, rows: np.ndarray, kmax: int,
                    lib_unit: torch.Tensor | None = None):
    """For each of ``rows``: cosine similarities of its ``kmax`` most similar training faces ``(n, k)``,
    their ΔW Gram ``(k, k)`` and inner products with the row's LoRA ``(k,)`` (lists), the indices
    (pack rows) ``(n, k)``."""
    if lib_unit is None:
        lib_unit = unit_rows(torch.from_numpy(pack.read_embeddings(train_rows)).float())
    sims, top = cosine_top_k(torch.from_numpy(pack.read_embeddings(rows)).float(), lib_unit, kmax)
    nb = np.asarray(train_rows)[top.numpy()]
    truth = pack.read_rows(rows)
    grams, inner = [], []
    for t in range(len(rows)):
        v = pack.read_rows(nb[t])
        grams.append(delta_gram(layout, v, v))
        inner.append(delta_gram(layout, v, truth[t : t + 1])[:, 0])
    return sims.numpy(), grams, inner, nb


def blend_cosines(sims, grams, inner, tt: np.ndarray, k: int, tau: float) -> np.ndarray:
    """Per-row ΔW cosine of the blend with ``k`` neighbours and temperature ``tau``."""
    pp, pt = np.zeros(len(tt)), np.zeros(len(tt))
    for t in range(len(tt)):
        w = softmax_weights(torch.as_tensor(sims[t, :k]), tau).numpy().astype(np.float64)
        pt[t] = w @ inner[t][:k]
        pp[t] = w @ grams[t][:k, :k] @ w
    return _cosines(pt, pp, tt)


def tune_blend_table(sims, grams, inner, tt: np.ndarray) -> tuple[dict, dict]:
    """``(k, temperature)`` with the best mean ΔW cosine over the table's rows, and the grid of scores."""
    grid = {}
    for k in BLEND_K:
        for tau in BLEND_TEMPERATURE if k > 1 else (1.0,):
            grid[(k, tau)] = float(blend_cosines(sims, grams, inner, tt, min(k, sims.shape[1]), tau).mean())
    (k, tau), best = max(grid.items(), key=lambda kv: kv[1])
    return {"k": k, "temperature": tau, "validation_delta_cosine": best}, {f"k={a},t={b:g}": v for (a, b), v in grid.items()}


def self_inner(layout, x: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(np.asarray(x)).double()
    return delta_inner(layout, x, x).numpy()


@torch.no_grad()
def sample_cosines(layout, latent, hyper, cond: torch.Tensor, truth: np.ndarray, tt: np.ndarray, samples: int,
                   seed: int) -> np.ndarray:
    """Per-row expected ΔW cosine of one sample (the mean over ``samples`` draws)."""
    out = np.zeros(len(cond))
    for i in range(0, len(cond), 16):
        c = cond[i : i + 16]
        x = decode_rows(latent, hyper.sample(c, seed=seed + i, n_samples=samples)).reshape(len(c), samples, -1)
        for j in range(len(c)):
            g = delta_gram(layout, x[j], np.concatenate([x[j], truth[i + j : i + j + 1]]))
            out[i + j] = np.mean(_cosines(g[:, -1], np.diag(g[:, :-1]), np.full(samples, tt[i + j])))
    return out


@torch.no_grad()
def average_cosines(layout, latent, hyper, cond: torch.Tensor, truth: np.ndarray, tt: np.ndarray) -> np.ndarray:
    """Per-row ΔW cosine of the model's expected ΔW (the mean ΔW of its sigma points)."""
    out = np.zeros(len(cond))
    per = max(1, (256 << 20) // (2 * hyper.config.latent_dim * truth.shape[1] * 8))  # ~256 MB of points at a time
    for i in range(0, len(cond), per):
        c = cond[i : i + per]
        pts = decode_rows(latent, hyper.expected_latents(c)).reshape(len(c), -1, truth.shape[1])
        for j in range(len(c)):
            g = delta_gram(layout, pts[j], np.concatenate([pts[j], truth[i + j : i + j + 1]]))
            out[i + j] = _cosines(np.array([g[:, -1].mean()]), np.array([g[:, :-1].mean()]), tt[i + j : i + j + 1])[0]
    return out


def pick_default(score: dict[str, float], blend: str = "", rows: int = 0) -> tuple[str, list[str]]:
    """The default strategy from validation scores (``diffusion``, ``average``, ``nearest``, ``blend``):
    one sample, unless it is below nearest or the average is below the blend; then the best of the
    four. Returns ``(strategy, notes)``: one line per reason, and one naming the new default."""
    on = f" on {rows} validation people" if rows else ""
    notes = []
    if score["diffusion"] < score["nearest"]:
        notes.append(f"one sample ({score['diffusion']:.3f}) is below nearest ({score['nearest']:.3f}){on}")
    if score["average"] < score["blend"]:
        notes.append(f"the average ({score['average']:.3f}) is below the blend {blend} ({score['blend']:.3f}){on}".replace("  ", " "))
    if not notes:
        return "diffusion", notes
    strategy = max(DEFAULT_STRATEGIES, key=lambda k: score[k])
    notes.append(f"default strategy: {strategy} (the best on validation; `--strategy diffusion` still samples)")
    return strategy, notes


def choose_default_strategy(layout, pack, latent, hyper, train_rows: np.ndarray, val_rows: np.ndarray,
                            max_rows: int = 200, samples: int = 4, seed: int = 0) -> dict:
    """Score one sample, the average, nearest and the tuned blend on validation people (module
    docstring); the model's default strategy and blend settings, with the reasons. Returns a dict
    for ``hypernet.json``'s ``defaults``: ``strategy``, ``blend`` (``k``, ``temperature``),
    ``validation`` (mean ΔW cosine per strategy), ``notes`` (one line each)."""
    rows = np.asarray(val_rows, dtype=np.int64)[:max_rows]
    truth = pack.read_rows(rows).astype(np.float64)
    tt = self_inner(layout, truth)
    cond = torch.from_numpy(pack.read_embeddings(rows)).float()
    sims, grams, inner, _ = neighbour_table(layout, pack, train_rows, rows, max(BLEND_K))
    chosen, grid = tune_blend_table(sims, grams, inner, tt)
    per = {
        "diffusion": sample_cosines(layout, latent, hyper, cond, truth, tt, samples, seed),
        "average": average_cosines(layout, latent, hyper, cond, truth, tt),
        "nearest": _cosines(np.array([p[0] for p in inner]), np.array([g[0, 0] for g in grams]), tt),
        "blend": blend_cosines(sims, grams, inner, tt, min(chosen["k"], sims.shape[1]), chosen["temperature"]),
    }
    score = {k: float(v.mean()) for k, v in per.items()}
    strategy, notes = pick_default(score, f"k={chosen['k']} τ={chosen['temperature']:g}", len(rows))
    return {"strategy": strategy, "blend": {"k": int(chosen["k"]), "temperature": float(chosen["temperature"])},
            "validation": score, "validation_rows": int(len(rows)), "samples_per_face": samples, "notes": notes,
            "blend_grid": grid, "rule": "one sample unless it is below nearest or the average below the tuned "
                                        "blend; then the best of diffusion, average, blend, nearest"}


__all__ = ["BLEND_K", "BLEND_TEMPERATURE", "DEFAULT_STRATEGIES", "average_cosines", "blend_cosines",
           "choose_default_strategy", "neighbour_table", "pick_default", "sample_cosines", "self_inner", "tune_blend_table"]
