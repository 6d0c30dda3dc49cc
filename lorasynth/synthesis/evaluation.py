"""Held-out evaluation of a synthesis model, honest by construction.

The model's pack is split *by person* into train / validation / test
(:meth:`lorasynth.models.model_folder.SynthesisModel.create`). Every setting a strategy tunes
(blend's k and temperature, the regression's kernel, the sampler) is chosen on validation
people; the test people are only scored, and :func:`check_isolation` refuses to score when one
of them leaked into training, into the latent model's standardisation statistics, into the
hypernetwork's training conditions or into the neighbour search.

Scores are cosines of the concatenated ``delta W`` of all modules (computed from factors):

* ``mean_lora``: the mean *delta W* of the training LoRAs (not the mean factor vector);
* ``nearest``, ``blend`` (the synthesis settings' k, temperature), ``blend_tuned`` (k, temperature
  chosen on validation);
* ``regression``: kernel ridge regression embedding -> latent (tuned on validation), decoded;
* ``diffusion``: one sample (the expected score of a single sample: the mean over N samples of
  each one's cosine), ``diffusion_mean``: the exact average of the N samples' delta W (what
  ``lorasynth synthesize --samples N --average`` writes), plus the pairwise cosine of samples of
  one face (their spread) and a memorization check (each sample's best cosine to a training
  LoRA, against the same for the held-out truths);
* ``oracle`` (planted worlds only, ``oracle=`` a sampler of the true conditional): the same
  three numbers for exact samples: the best achievable;
* the latent model's reconstruction against PCA of equal size.

``identity_similarity`` computes the paper's headline metric (face cosine between images
generated with a synthesized LoRA and the input face): meaningful only with real SD1.5
weights; on the random-weight demo model it shows the mechanics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lorasynth.errors import LorasynthError
from lorasynth.core.safe_io import atomic_write, write_text
from lorasynth.core.delta import delta_gram, delta_inner, factor_views
from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesizer
# BLEND_K / BLEND_TEMPERATURE: the blend settings tuned on validation (re-exported)
from lorasynth.training.strategy_choice import BLEND_K, BLEND_TEMPERATURE, neighbour_table, tune_blend_table  # noqa: F401



class LeakError(LorasynthError):
    """A held-out (test) person reached something that was fitted or searched."""


# --------------------------------------------------------------------------- delta-W geometry


def _self_inner(layout, x) -> np.ndarray:
    return delta_inner(layout, torch.as_tensor(np.asarray(x)).double(), torch.as_tensor(np.asarray(x)).double()).numpy()


def _scores(pred_pred, pred_true, true_true) -> dict:
    cos = pred_true / np.sqrt(np.maximum(pred_pred * true_true, 1e-300))
    rel = np.sqrt(np.maximum(pred_pred + true_true - 2 * pred_true, 0) / np.maximum(true_true, 1e-300))
    return {"delta_cosine_mean": float(cos.mean()), "delta_cosine_median": float(np.median(cos)),
            "relative_error_mean": float(rel.mean()), "n": int(len(cos))}


def _point_scores(layout, pred, truth, tt) -> dict:
    pred = np.asarray(pred, dtype=np.float64)
    return _scores(_self_inner(layout, pred), delta_inner(layout, torch.from_numpy(pred), torch.as_tensor(truth)).numpy(), tt)


def mean_delta_modules(layout, pack, rows, batch: int = 512) -> list[torch.Tensor]:
    """The mean delta W of pack rows, one dense matrix per module (float64)."""
    sums = None
    for i in range(0, len(rows), batch):
        v = torch.from_numpy(pack.read_rows(rows[i : i + batch])).double()
        parts = [torch.einsum("nor,nri->oi", b, a) for b, a in factor_views(layout, v)]
        sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
    return [s / max(len(rows), 1) for s in sums]


def sample_scores(layout, samples: np.ndarray, truth: np.ndarray) -> dict:
    """Scores of ``samples`` (n, S, D) against ``truth`` (n, D): one sample, exact mean of S, spread.

    ``one``: mean over faces and samples of each sample's cosine (the expected score of one
    sample); ``mean_of_n``: cosine of the average of the S samples' delta W; ``pairwise``: mean
    cosine between two samples of one face (1 = no variety).
    """
    n, s, d = samples.shape
    one, avg, pair, rel = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    tt = _self_inner(layout, truth)
    off = ~np.eye(s, dtype=bool)
    for i in range(n):
        g = delta_gram(layout, samples[i], samples[i])
        st = delta_gram(layout, samples[i], truth[i : i + 1])[:, 0]
        dg = np.maximum(np.diag(g), 1e-300)
        one[i] = np.mean(st / np.sqrt(dg * tt[i]))
        avg[i] = st.mean() / np.sqrt(max(g.mean(), 1e-300) * tt[i])
        rel[i] = np.sqrt(max(g.mean() + tt[i] - 2 * st.mean(), 0) / max(tt[i], 1e-300))
        if s > 1:
            pair[i] = (g / np.sqrt(dg[:, None] * dg[None, :]))[off].mean()
    return {"one_sample": float(one.mean()), "mean_of_n": float(avg.mean()),
            "pairwise_cosine": float(pair.mean()) if s > 1 else None, "n_samples": int(s), "n": int(n),
            "mean_of_n_relative_error": float(rel.mean())}


def best_training_match(layout, pack, train_rows, queries: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Each query's highest delta-W cosine to a training LoRA (the memorization distance)."""
    qn = np.sqrt(np.maximum(_self_inner(layout, queries), 1e-300))
    best = np.full(len(queries), -np.inf)
    for i in range(0, len(train_rows), batch):
        t = pack.read_rows(train_rows[i : i + batch])
        tn = np.sqrt(np.maximum(_self_inner(layout, t), 1e-300))
        best = np.maximum(best, (delta_gram(layout, queries, t) / (qn[:, None] * tn[None, :])).max(axis=1))
    return best


# --------------------------------------------------------------------------- isolation


def check_isolation(syn: Synthesizer) -> dict:
    """Raise :class:`LeakError` if a test person reached training, statistics or neighbour search.

    Checks: test persons vs training and validation persons (by :func:`~lorasynth.library.splits.person_key`
    of the pack ids); the latent model's standardisation statistics equal those of the training
    rows; no hypernetwork training condition (its kernel landmarks or neighbour-mean rows) is a
    test embedding; the neighbour search draws only from training rows.
    """
    from lorasynth.library.splits import persons_of

    info, pack = syn.model.info, syn.pack
    test, train, val = (np.asarray(x, dtype=np.int64) for x in (info.heldout_ids, info.train_ids, info.val_ids))
    test_p = persons_of(pack.ids, test)
    if test_p & persons_of(pack.ids, train):
        raise LeakError(f"{len(test_p & persons_of(pack.ids, train))} held-out persons have LoRAs in the training rows")
    if test_p & persons_of(pack.ids, val):
        raise LeakError("held-out persons are also validation persons")
    lat = syn.latent
    if hasattr(lat, "mean") and len(train) and len(test):
        from lorasynth.models.latent import row_stats

        mean, scale = row_stats(pack, train)
        got_mean = np.asarray(torch.as_tensor(lat.mean).cpu(), dtype=np.float32)
        got_scale = np.asarray(torch.as_tensor(lat.scale).cpu(), dtype=np.float32)
        tol = 1e-4 * (np.abs(scale).mean() + 1e-12)
        if np.abs(got_mean - mean).max() > 10 * tol or np.abs(got_scale - scale).max() > 1e-3 * np.abs(scale).max():
            raise LeakError("the latent model's standardisation statistics are not those of the training rows "
                            "(were held-out rows used to fit it?)")
    if info.has_hypernet:
        for name, rows in (("held-out", test), ("validation", val)):
            if len(rows):
                hypernet_conditions_exclude(syn.hypernet, pack.read_embeddings(rows), name)
    lib = syn.train_rows
    if np.isin(lib, test).any():
        raise LeakError("the neighbour library contains held-out rows")
    return {"test_persons": len(test_p), "train_rows": int(len(train)), "val_rows": int(len(val)),
            "test_rows": int(len(test)), "leaks": 0}


def hypernet_conditions_exclude(hyper, embeddings: np.ndarray, name: str) -> None:
    """Raise :class:`LeakError` if one of ``embeddings`` is a condition the hypernetwork was fitted on:
    its kernel landmarks (a sample of the training rows), the neighbour mean's rows, or the local
    covariance's rows (every training row: a leak shows even with more rows than landmarks)."""
    from lorasynth.models.hypernet.regression import unit_rows

    e = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    if len(hyper.landmarks):
        d = torch.cdist(hyper.normalize_cond(e), hyper.landmarks).min(dim=1).values
        if bool((d < 1e-5).any()):
            raise LeakError(f"{int((d < 1e-5).sum())} {name} embeddings are hypernetwork training conditions")
    u = unit_rows(e)
    for what, db in (("neighbour mean", hyper.nb_cond), ("residual covariance", hyper.cov_cond)):
        if len(db):  # unit-norm raw training embeddings
            hit = torch.cat([(u[i : i + 1024] @ db.T).max(dim=1).values for i in range(0, len(u), 1024)])
            if bool((hit > 1 - 1e-6).any()):
                raise LeakError(f"{int((hit > 1 - 1e-6).sum())} {name} embeddings are hypernetwork training "
                                f"conditions (its {what})")


# --------------------------------------------------------------------------- the evaluation


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _neighbour_table(syn: Synthesizer, rows: np.ndarray, kmax: int):
    """Per row: top-kmax training neighbours' sims, their Gram matrix and inner products with the truth."""
    sims, grams, inner, _ = neighbour_table(syn.layout, syn.pack, syn.train_rows, rows, kmax,
                                            lib_unit=torch.from_numpy(syn.library_embeddings()))
    return sims, grams, inner


def _blend_score(sims, grams, inner, tt, k: int, tau: float, syn: Synthesizer) -> dict:
    pp, pt = np.zeros(len(tt)), np.zeros(len(tt))
    for t in range(len(tt)):
        w = syn.blend_weights(sims[t, :k], tau)
        pt[t] = w @ inner[t][:k]
        pp[t] = w @ grams[t][:k, :k] @ w
    return _scores(pp, pt, tt)


def tune_blend(syn: Synthesizer, val_rows: np.ndarray) -> tuple[dict, dict]:
    """(k, temperature) with the best validation delta-W cosine, and the grid of scores."""
    truth = syn.pack.read_rows(val_rows)
    tt = _self_inner(syn.layout, truth)
    sims, grams, inner = _neighbour_table(syn, val_rows, max(BLEND_K))
    return tune_blend_table(sims, grams, inner, tt)


def regression_baseline(syn: Synthesizer, test_rows: np.ndarray):
    """Kernel ridge regression embedding -> latent, tuned on validation: predicted raw vectors."""
    from lorasynth.models.hypernet.regression import fit_kernel_mean
    from lorasynth.models.latent import encode_rows

    info, pack, lat = syn.model.info, syn.pack, syn.latent
    train = np.asarray(info.train_ids)
    val = np.asarray(info.val_ids, dtype=np.int64)
    z = encode_rows(lat, pack, train)
    mu, sd = z.mean(0), z.std(0).clamp_min(1e-8)
    e = torch.from_numpy(_unit(pack.read_embeddings(train)))
    vz = ve = None
    if len(val):
        vz = (encode_rows(lat, pack, val) - mu) / sd
        ve = torch.from_numpy(_unit(pack.read_embeddings(val)))
    model, _, report = fit_kernel_mean(e, (z - mu) / sd, ve, vz, n_landmarks=2048)
    pred = model(torch.from_numpy(_unit(pack.read_embeddings(test_rows)))) * sd + mu
    return syn.decode(pred), report


# --------------------------------------------------------------------------- evaluate: steps


def _eval_rows(syn: Synthesizer, split: str, max_items: int | None) -> tuple[np.ndarray, dict]:
    """The pack rows to score (the ``split`` people, at most ``max_items``) and the isolation check's result."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    test = np.asarray(syn.model.info.heldout_ids if split == "test" else syn.model.info.val_ids, dtype=np.int64)
    if len(test) == 0:
        raise ValueError(f"the model has no {split} rows: train it with --holdout FRACTION to evaluate")
    isolation = check_isolation(syn)
    if max_items:
        test = test[:max_items]
    return test, isolation


def _mean_lora_scores(syn: Synthesizer, truth: np.ndarray, tt: np.ndarray) -> dict:
    """Scores of the mean delta W of the training LoRAs against every truth."""
    layout = syn.layout
    mean_mods = mean_delta_modules(layout, syn.pack, syn.train_rows)
    mm = float(sum((m * m).sum() for m in mean_mods))
    mt = np.zeros(len(truth))
    for (b, a), m in zip(factor_views(layout, torch.from_numpy(truth)), mean_mods):
        mt += torch.einsum("nor,oi,nri->n", b, m, a).numpy()
    return _scores(np.full(len(truth), mm), mt, tt)


def _neighbour_strategies(syn: Synthesizer, strategies, test: np.ndarray, val: np.ndarray, tt: np.ndarray,
                          s: SynthesisSettings, tune: bool, results: dict) -> None:
    """``nearest``, ``blend`` (the settings' k and temperature) and ``blend_tuned`` (on validation) into ``results``."""
    if "nearest" not in strategies and "blend" not in strategies:
        return
    st = results["strategies"]
    kmax = max(s.k, max(BLEND_K) if tune and len(val) else 1)
    sims, grams, inner = _neighbour_table(syn, test, kmax)
    if "nearest" in strategies:
        st["nearest"] = _scores(np.array([g[0, 0] for g in grams]), np.array([p[0] for p in inner]), tt)
    if "blend" in strategies:
        st["blend"] = _blend_score(sims, grams, inner, tt, min(s.k, sims.shape[1]), s.temperature, syn)
        results["blend_settings"] = {"k": s.k, "temperature": s.temperature}
        if tune and len(val):
            chosen, grid = tune_blend(syn, val)
            st["blend_tuned"] = _blend_score(sims, grams, inner, tt, min(chosen["k"], sims.shape[1]),
                                             chosen["temperature"], syn)
            results["blend_tuned_settings"] = {**chosen, "chosen_on": f"{len(val)} validation rows"}


def _decoded_samples(syn: Synthesizer, cond: np.ndarray, s: SynthesisSettings, n: int, **kw) -> np.ndarray:
    """``n`` hypernetwork samples per condition, decoded: ``(len(cond), n, D)`` float64."""
    z = syn.hypernet.sample(torch.from_numpy(cond), num_steps=s.steps, guidance=s.guidance, seed=s.seed,
                            n_samples=n, **kw)
    return syn.decode(z).astype(np.float64).reshape(len(cond), n, -1)


def _expected_scores(syn: Synthesizer, cond: np.ndarray, truth: np.ndarray, dim: int) -> dict:
    """Scores of the exact expected delta W of the model's samples (what ``synthesize --average`` means)."""
    exp_cos = exp_rel = 0.0
    n_points = 0
    for i in range(0, len(cond), 8):  # 2K points per face: a few faces at a time (w2w vectors are large)
        ze = syn.hypernet.expected_latents(torch.from_numpy(cond[i : i + 8]))
        points = syn.decode(ze).astype(np.float64).reshape(len(cond[i : i + 8]), -1, dim)
        n_points = points.shape[1]
        sc = sample_scores(syn.layout, points, truth[i : i + 8])
        exp_cos += sc["mean_of_n"] * len(points)
        exp_rel += sc["mean_of_n_relative_error"] * len(points)
    return {"delta_cosine_mean": exp_cos / len(cond), "relative_error_mean": exp_rel / len(cond),
            "n": int(len(cond)), "sigma_points": int(n_points)}


def _memorization(syn: Synthesizer, truth: np.ndarray, first: np.ndarray) -> dict:
    """Whether samples sit closer to training LoRAs than the held-out truths (as the latent holds them) do."""
    from lorasynth.models.latent import reconstruct

    layout, pack = syn.layout, syn.pack
    train_best = best_training_match(layout, pack, syn.train_rows, truth)
    sample_best = best_training_match(layout, pack, syn.train_rows, first)
    # the truths as the latent holds them: samples live in the latent space the training rows
    # span, so a perfect model's samples would be this close to training rows, not closer
    recon = reconstruct(syn.latent, torch.from_numpy(truth).float()).double().numpy()
    recon_best = best_training_match(layout, pack, syn.train_rows, recon)
    reference = max(float(np.median(train_best)), float(np.median(recon_best)))
    return {
        "sample_best_train_cosine_median": float(np.median(sample_best)),
        "truth_best_train_cosine_median": float(np.median(train_best)),
        "truth_in_latent_best_train_cosine_median": float(np.median(recon_best)),
        "memorizes": bool(np.median(sample_best) > reference + 0.02),
    }


def _diffusion_strategies(syn: Synthesizer, cond: np.ndarray, truth: np.ndarray, tt: np.ndarray,
                          s: SynthesisSettings, n_samples: int, memorization: bool, results: dict) -> None:
    """``diffusion_expected``, ``diffusion`` and ``diffusion_mean`` scores, sample spread and memorization into ``results``."""
    layout, st = syn.layout, results["strategies"]
    n = max(1, n_samples)
    samples = _decoded_samples(syn, cond, s, n)
    ss = sample_scores(layout, samples, truth)
    # the average mode (synthesize --average) draws the same samples centred on the closed-form mean
    centred = _decoded_samples(syn, cond, s, n, center=True)
    sc = sample_scores(layout, centred, truth)
    ss["mean_of_n"], ss["mean_of_n_relative_error"] = sc["mean_of_n"], sc["mean_of_n_relative_error"]
    # the expectation (synthesize --average): the exact mean delta W of the model's samples
    st["diffusion_expected"] = _expected_scores(syn, cond, truth, samples.shape[-1])
    first = samples[:, 0]
    st["diffusion"] = _point_scores(layout, first, truth, tt)
    st["diffusion"]["delta_cosine_mean"] = ss["one_sample"]  # expected score of one sample
    st["diffusion"]["first_sample_delta_cosine_mean"] = _point_scores(layout, first, truth, tt)["delta_cosine_mean"]
    st["diffusion_mean"] = {"delta_cosine_mean": ss["mean_of_n"], "n": int(len(cond)), "n_samples": n,
                            "relative_error_mean": ss["mean_of_n_relative_error"]}
    d = syn.hypernet.sampling_defaults
    results["diffusion_settings"] = {"guidance": s.guidance if s.guidance is not None else d.get("guidance"),
                                     "steps": s.steps or d.get("num_steps"), "eta": d.get("eta"), "seed": s.seed,
                                     "n_samples": n}
    results["samples"] = {"pairwise_cosine": ss["pairwise_cosine"]}
    if memorization:
        results["memorization"] = _memorization(syn, truth, first)


def _oracle_scores(oracle: Callable[[np.ndarray, int], np.ndarray], syn: Synthesizer, test: np.ndarray,
                   truth: np.ndarray, n_samples: int, with_diffusion: bool, results: dict) -> None:
    """The best achievable scores (exact samples of the true conditional), and the spread gap to the model's."""
    o = np.asarray(oracle(test, max(2, n_samples)), dtype=np.float64)
    results["oracle"] = sample_scores(syn.layout, o, truth)
    if with_diffusion:
        results["samples"]["oracle_pairwise_cosine"] = results["oracle"]["pairwise_cosine"]
        results["samples"]["spread_gap"] = results["samples"]["pairwise_cosine"] - results["oracle"]["pairwise_cosine"]


# --------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(syn: Synthesizer, strategies=("diffusion", "blend", "nearest"), max_items: int | None = None,
             settings: SynthesisSettings | None = None, pca_baseline: bool = True, n_samples: int = 16,
             oracle: Callable[[np.ndarray, int], np.ndarray] | None = None, memorization: bool = True,
             tune: bool = True, split: str = "test") -> dict:
    """Held-out metrics per strategy (see module docstring).

    ``oracle(rows, n)``: exact samples ``(len(rows), n, D)`` of the true conditional of pack rows
    (a planted world's :meth:`~lorasynth.worlds.planted.SyntheticWorld.oracle_vectors`).
    ``tune``: also tune blend on validation and fit the regression baseline.
    ``split``: score the ``"test"`` people (the final number) or the ``"validation"`` people (for
    comparing designs without looking at the test people; the blend tuned on them is then
    optimistic, the other strategies are as held-out as on test).
    """
    s = syn.resolve(settings or SynthesisSettings())  # the blend's k and temperature: the model's by default
    layout, pack = syn.layout, syn.pack
    test, isolation = _eval_rows(syn, split, max_items)
    val = np.asarray(syn.model.info.val_ids, dtype=np.int64)
    truth = pack.read_rows(test).astype(np.float64)
    cond = _unit(pack.read_embeddings(test))
    tt = _self_inner(layout, truth)
    results: dict = {"split": split, "heldout": int(len(test)), "train": int(len(syn.train_rows)), "validation": int(len(val)),
                     "layout": layout.signature, "embedder": syn.model.info.embedder, "isolation": isolation,
                     "default_strategy": syn.model_defaults().get("strategy", "diffusion"), "strategies": {}}
    results["strategies"]["mean_lora"] = _mean_lora_scores(syn, truth, tt)
    _neighbour_strategies(syn, strategies, test, val, tt, s, tune, results)
    if tune:
        pred, report = regression_baseline(syn, test)
        results["strategies"]["regression"] = _point_scores(layout, pred, truth, tt)
        results["regression_settings"] = report
    if "diffusion" in strategies:
        _diffusion_strategies(syn, cond, truth, tt, s, n_samples, memorization, results)
    if oracle is not None:
        _oracle_scores(oracle, syn, test, truth, n_samples, "diffusion" in strategies, results)
    results["latent"] = latent_reconstruction(syn, test, pca_baseline)
    return results


@torch.no_grad()
def latent_reconstruction(syn: Synthesizer, test: np.ndarray, pca_baseline: bool = True) -> dict:
    """Reconstruction delta-cosine on held-out rows: the model's latent vs PCA of equal size."""
    from lorasynth.models.latent import reconstruction_cosine

    out = {"kind": syn.model.info.latent_kind, "latent_dim": syn.latent.latent_dim,
           "reconstruction_delta_cosine": reconstruction_cosine(syn.latent, syn.pack, test, metric="delta")}
    if pca_baseline:
        if syn.model.info.latent_kind == "pca":
            out["pca_reconstruction_delta_cosine"] = out["reconstruction_delta_cosine"]
            out["pca_latent_dim"] = syn.latent.latent_dim
        else:
            from lorasynth.models.latent.pca import fit_pca

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
    from lorasynth.runtime.apply import fused
    from lorasynth.errors import FaceError
    from lorasynth.faces import get_embedder
    from lorasynth.runtime.pipeline import GenerationSettings, generate, load_pipeline

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
