"""Quality on a small hard planted world, with the real training code (the issue's guard rails).

The world hides 40% of each LoRA's code variance from the face embedding and gives every person
two LoRAs. The model is split by person into train / validation / test. Held-out, the mean of N
diffusion samples and the model's expected delta W (``synthesize --average``) must reach the
kernel-ridge regression baseline and the blend (both tuned on validation), single samples must
spread like exact samples of the true conditional (the world's oracle, within 0.05) and score at
least 0.9 x its one sample, and the
evaluation must refuse to score when a test person leaks into training, the latent statistics,
the hypernetwork or the neighbour search. ``scripts/bench_quality.py`` runs the full grid.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from lorasynth.synthesis.evaluation import LeakError, evaluate
from lorasynth.training.model_parts import train_hypernet, train_latent
from lorasynth.library.pack import open_pack
from lorasynth.library.splits import persons_of
from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesizer
from lorasynth.models.model_folder import SynthesisModel
from lorasynth.worlds.planted import hard_world_config, make_world, write_world_pack
from lorasynth.training.lightning import TrainConfig

QUIET = dict(progress=False, ckpt_every=10**9)


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    world = make_world(hard_world_config(600, "tiny", visible_fraction=0.6, loras_per_person=2, seed=1))
    write_world_pack(world, root / "pack")
    model = SynthesisModel.create(root / "model", open_pack(root / "pack"), heldout_frac=0.1, seed=0, val_frac=0.1)
    train_latent(model, "pca", 32)
    train_hypernet(model, TrainConfig(max_steps=300, batch_size=256, lr=2e-3, **QUIET), {"width": 128})
    return world, root


@pytest.fixture(scope="module")
def results(world_model):
    world, root = world_model
    return evaluate(Synthesizer(root / "model"), n_samples=8, oracle=lambda rows, n: world.oracle_vectors(rows, n))


def test_split_is_by_person(world_model):
    _, root = world_model
    model = SynthesisModel.open(root / "model")
    ids = open_pack(root / "pack").ids
    train, val, test = (persons_of(ids, getattr(model.info, k)) for k in ("train_ids", "val_ids", "heldout_ids"))
    assert train and val and test
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(model.info.heldout_ids) == 2 * len(test)  # both LoRAs of every test person


def test_designs_can_be_compared_on_validation_people(world_model):
    """``evaluate(split="validation")`` scores the validation people, never the test people."""
    _, root = world_model
    syn = Synthesizer(root / "model")
    res = evaluate(syn, strategies=("nearest",), tune=False, memorization=False, pca_baseline=False,
                   split="validation")
    assert res["split"] == "validation" and res["heldout"] == len(syn.model.info.val_ids)
    test = evaluate(syn, strategies=("nearest",), tune=False, memorization=False, pca_baseline=False)
    assert test["split"] == "test" and test["heldout"] == len(syn.model.info.heldout_ids)
    assert res["strategies"]["nearest"] != test["strategies"]["nearest"]
    with pytest.raises(ValueError, match="split"):
        evaluate(syn, split="train")


def test_average_beats_the_regression_baselines(results):
    cos = {k: v["delta_cosine_mean"] for k, v in results["strategies"].items()}
    print("held-out delta-W cosine:", json.dumps(cos), "oracle:", results["oracle"], "samples:", results["samples"])
    # the expected delta W (synthesize --average) against the best simple baselines, tuned on validation
    assert cos["diffusion_expected"] >= cos["regression"], cos  # kernel ridge in latent space
    assert cos["diffusion_expected"] >= cos["blend_tuned"], cos  # blend with k, tau tuned on validation
    assert cos["diffusion_mean"] >= cos["regression"], cos  # the mean of 8 samples too
    assert cos["regression"] > cos["nearest"] and cos["regression"] > cos["mean_lora"] + 0.1
    assert cos["diffusion_expected"] > cos["diffusion_mean"] > cos["diffusion"]  # averaging samples helps


def test_samples_spread_like_the_oracle_and_do_not_memorize(results, world_model):
    samples, oracle = results["samples"], results["oracle"]
    meta = json.loads((world_model[1] / "model" / "hypernet" / "hypernet.json").read_text())
    print("calibration:", meta["calibration"]["chosen"], "mean:", {k: v for k, v in meta["mean"].items() if "mse" not in k})
    # every setting of the residual model was chosen on validation people, and is recorded
    assert meta["residual_pairs"]["k"] in (8, 16, 32, 64, 128) and "validation" in meta["residual_pairs"]["on"]
    assert meta["covariance"]["validation_nll"] <= meta["covariance"]["global_validation_nll"]
    assert "delta W" in meta["calibration"]["on"]
    # the temperature makes one face's samples as alike as the LoRAs of look-alike people are,
    # estimated on validation people alone; that estimate is the oracle's spread (never seen)
    spread = meta["calibration"]["look_alike_spread"]
    print("look-alike spread:", spread, "oracle pairwise:", oracle["pairwise_cosine"])
    assert abs(spread["pairwise_cosine"] - oracle["pairwise_cosine"]) < 0.05
    assert "look-alike" in meta["calibration"]["temperature_rule"]
    # the old model: pairwise cosine 0.9999 (gap ~ +0.4). The oracle samples the exact conditional
    assert abs(samples["spread_gap"]) <= 0.05, samples  # here +0.03
    # the calibration solved the temperature (no clamp) and checked the spread it reached on fresh samples
    achieved = meta["calibration"]["achieved"]
    assert meta["calibration"]["temperature_solve"]["reached"] and achieved["target_reached"], achieved
    assert abs(achieved["pairwise_cosine"] - spread["pairwise_cosine"]) <= 0.05
    assert abs(achieved["pairwise_cosine"] - oracle["pairwise_cosine"]) <= 0.07  # seen on test people too
    assert results["strategies"]["diffusion"]["delta_cosine_mean"] >= 0.9 * oracle["one_sample"]  # here 0.95
    assert not results["memorization"]["memorizes"], results["memorization"]
    assert results["isolation"]["leaks"] == 0


def _copy_model(root, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(root / "model", dst, ignore=shutil.ignore_patterns("train"))
    return dst


def test_evaluation_refuses_a_test_person_in_training(world_model, tmp_path):
    _, root = world_model
    dst = _copy_model(root, tmp_path)
    model = SynthesisModel.open(dst)
    model.info.train_ids = sorted(model.info.train_ids + model.info.heldout_ids[:1])  # one leaked row
    model.save()
    with pytest.raises(LeakError, match="training rows"):
        evaluate(Synthesizer(dst), strategies=("nearest",), tune=False)


def test_evaluation_refuses_latent_statistics_fitted_on_test_people(world_model, tmp_path):
    from lorasynth.models.latent.pca import fit_pca

    _, root = world_model
    dst = _copy_model(root, tmp_path)
    model = SynthesisModel.open(dst)
    pack = open_pack(root / "pack")
    fit_pca(pack, 32, idx=np.arange(pack.n)).export(model.latent_dir)  # every row, test people included
    model.save()  # record the new files' hashes, as any re-export does (else the integrity check refuses first)
    with pytest.raises(LeakError, match="statistics"):
        evaluate(Synthesizer(dst), strategies=("nearest",), tune=False)


def test_evaluation_refuses_a_hypernet_trained_on_test_people(world_model, tmp_path):
    _, root = world_model
    dst = _copy_model(root, tmp_path)
    model = SynthesisModel.open(dst)
    train_ids = model.info.train_ids
    model.info.train_ids = sorted(train_ids + model.info.heldout_ids)
    train_hypernet(model, TrainConfig(max_steps=5, batch_size=64, **QUIET), {"width": 32}, calibrate=False)
    model.info.train_ids = train_ids  # hide it again: the hypernet's own training conditions give it away
    model.save()
    with pytest.raises(LeakError, match="hypernetwork"):
        evaluate(Synthesizer(dst), strategies=("nearest",), tune=False)


def test_neighbour_search_never_returns_test_rows(world_model):
    _, root = world_model
    syn = Synthesizer(root / "model")
    test = np.asarray(syn.model.info.heldout_ids)
    rows, _ = syn.neighbours(syn.pack.read_embeddings(test), 16)
    assert not np.isin(rows, test).any()


def test_cli_average_writes_the_exact_mean_of_the_samples(world_model, tmp_path):
    from lorasynth.apps.cli.main import main
    from lorasynth.formats import load_lora
    from lorasynth.formats.keys import ModuleTree

    _, root = world_model
    syn = Synthesizer(root / "model")
    e = syn.pack.read_embeddings([syn.model.info.heldout_ids[0]])[0]
    np.save(tmp_path / "e.npy", e)
    base = ["synthesize", "--embedding", str(tmp_path / "e.npy"), "--model", str(root / "model"), "--samples", "4"]
    assert main(base + ["-o", str(tmp_path / "s.safetensors")]) == 0
    assert main(base + ["--average", "-o", str(tmp_path / "avg.safetensors")]) == 0
    avg = load_lora(tmp_path / "avg.safetensors", tree=ModuleTree.from_specs(syn.layout.modules))  # tiny layout
    assert avg.metadata["lorasynth.average_of"] == "4"
    # the average is exactly the mean delta W of 4 samples (drawn centred on the closed-form mean)
    z = syn.diffusion_latents(syn.check_embedding(e), SynthesisSettings(samples=4, average=True))
    vecs = syn.decode(z)
    name = syn.layout.names[0]
    deltas = [syn.layout.unflatten(torch.from_numpy(v)).modules[name].delta(torch.float64) for v in vecs]
    torch.testing.assert_close(avg.modules[name].delta(torch.float64), sum(deltas) / 4, atol=1e-5, rtol=1e-4)
    # ... whose latent mean is the closed-form conditional mean
    h = syn.hypernet
    mean = h.denormalize_latent(h.conditional_mean(h.normalize_cond(torch.from_numpy(syn.check_embedding(e))[None])))
    torch.testing.assert_close(z.mean(0, keepdim=True), mean, atol=1e-4, rtol=1e-4)
    samples = [load_lora(tmp_path / f"s_{i}.safetensors", tree=ModuleTree.from_specs(syn.layout.modules)) for i in range(4)]
    assert not torch.allclose(samples[0].modules[name].delta(), samples[1].modules[name].delta())  # variety
    assert len(syn.synthesize(e, SynthesisSettings(samples=4, average=True))) == 1


def test_average_is_the_exact_expected_delta_w_of_the_model(world_model, tmp_path):
    """`synthesize --average` (one sample's worth of work) writes the model's expected delta W: the
    limit of the mean of many samples drawn with the face's mean and residual covariance."""
    from lorasynth.apps.cli.main import main
    from lorasynth.formats import load_lora
    from lorasynth.formats.keys import ModuleTree

    _, root = world_model
    syn = Synthesizer(root / "model")
    e = syn.pack.read_embeddings([syn.model.info.heldout_ids[1]])[0]
    np.save(tmp_path / "e.npy", e)
    out = tmp_path / "avg.safetensors"
    assert main(["synthesize", "--embedding", str(tmp_path / "e.npy"), "--model", str(root / "model"), "--average",
                 "-o", str(out)]) == 0
    avg = load_lora(out, tree=ModuleTree.from_specs(syn.layout.modules))
    assert avg.metadata["lorasynth.average_of"] == "expectation" and avg.metadata["lorasynth.expectation"] == "exact"
    assert float(avg.metadata["lorasynth.average_rank_error"]) < 1e-6  # rank 32 holds the tiny modules whole
    # Monte Carlo: 40,000 draws with the model's mean and covariance for this face
    h = syn.hypernet
    cn = h.normalize_cond(torch.from_numpy(syn.check_embedding(e))[None])
    cov = h.residual_covariance(cn)[0].double() * float(h.spread_scale.mean()) ** 2
    draws = h.conditional_mean(cn).double() + torch.randn(40000, cov.shape[0], dtype=torch.float64,
                                                          generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(
        cov + 1e-9 * torch.eye(cov.shape[0], dtype=torch.float64)).T
    vecs = torch.from_numpy(syn.decode(h.denormalize_latent(draws.float()))).double()
    from lorasynth.core.delta import factor_views

    for (b, a), name in zip(factor_views(syn.layout, vecs), syn.layout.names):
        mc = torch.einsum("nor,nri->oi", b, a) / len(vecs)
        got = avg.modules[name].delta(torch.float64)
        assert torch.nn.functional.cosine_similarity(mc.flatten(), got.flatten(), dim=0) > 0.999
        torch.testing.assert_close(got, mc, atol=0.02 * float(mc.abs().max()), rtol=0)


def test_edit_direction_moves_held_out_loras_along_a_planted_attribute(world_model):
    """`lorasynth edit`'s direction (least squares on training latents) recovers a planted attribute."""
    from types import SimpleNamespace

    from lorasynth.synthesis.editing import attribute_direction
    from lorasynth.models.latent import encode_rows

    _, root = world_model
    syn = Synthesizer(root / "model")
    pack = syn.pack
    x = pack.read_rows(np.arange(pack.n)).astype(np.float64)
    u = np.random.default_rng(0).standard_normal(x.shape[1])
    u /= np.linalg.norm(u)
    score = (x - x.mean(0)) @ u
    label = {pack.ids[i]: bool(score[i] > np.median(score)) for i in range(pack.n)}  # the planted attribute

    class Lib:  # the one call attribute_direction makes of a Library
        def resolve(self, entry_id):
            return SimpleNamespace(attributes={"Planted": label[str(entry_id)]})

    direction, std = attribute_direction(syn, Lib(), "Planted")
    test = np.asarray(syn.model.info.heldout_ids)
    z = encode_rows(syn.latent, pack, test)
    before = (syn.decode(z).astype(np.float64) - x.mean(0)) @ u
    for strength in (1.0, -1.0):  # what cmd_edit does
        after = (syn.decode(z + strength * std * torch.from_numpy(direction)[None]).astype(np.float64) - x.mean(0)) @ u
        assert np.all(np.sign(after - before) == strength)
        assert abs(float(np.mean(after - before))) > 0.5 * float(score[test].std())  # a visible move
    # a random direction moves the planted score far less
    r = torch.randn(len(direction), generator=torch.Generator().manual_seed(1))
    moved = (syn.decode(z + std * r[None] / r.norm()).astype(np.float64) - x.mean(0)) @ u
    assert abs(float(np.mean(moved - before))) < 0.5 * abs(float(np.mean(after - before)))


def test_identity_similarity_mechanics_on_the_tiny_pipeline(world_model, tiny_pipeline_dir, tmp_path, monkeypatch):
    """`eval --base B --faces DIR`: embed each photo, synthesize per strategy, generate with the LoRA
    fused, embed the image, score its cosine to the photo's embedding (a stand-in embedder here)."""
    from PIL import Image

    import lorasynth.faces as faces
    from lorasynth.errors import FaceError
    from lorasynth.synthesis.evaluation import identity_similarity
    from lorasynth.faces.base import Face, FaceSelection

    _, root = world_model
    dst = _copy_model(root, tmp_path)
    model = SynthesisModel.open(dst)
    model.info.embedder = "dlib"  # a photo embedder (the stand-in below answers for it)
    model.save()
    syn = Synthesizer(dst)
    test = syn.model.info.heldout_ids[:2]
    photo_emb = {f"p{i}.png": syn.pack.read_embeddings([r])[0] for i, r in enumerate(test)}
    faces_dir = tmp_path / "faces"
    faces_dir.mkdir()
    for name in photo_emb:
        Image.new("RGB", (32, 32), (120, 90, 60)).save(faces_dir / name)
    (faces_dir / "notes.txt").write_text("not a photo")
    proj = np.random.default_rng(0).standard_normal((64 * 64 * 3, syn.pack.embed_dim)).astype(np.float32)
    images = []

    class Stub:
        def __init__(self, fail=False):
            self.fail = fail

        def embed_with_report(self, photo, face_index=None):
            e = photo_emb[photo.name]
            return FaceSelection(Face(box=(0, 0, 32, 32), score=1.0, embedding=e), 0, 1)

        def embed(self, image):
            if self.fail:
                raise FaceError("no face in the image")
            images.append(np.asarray(image, dtype=np.float32))
            v = (np.asarray(image, dtype=np.float32).reshape(-1) / 255.0 - 0.5) @ proj
            return Face(box=(0, 0, 1, 1), score=1.0, embedding=v / np.linalg.norm(v))

    monkeypatch.setattr(faces, "get_embedder", lambda *a, **k: Stub())
    res = identity_similarity(syn, str(tiny_pipeline_dir), faces_dir, ("diffusion", "nearest"), steps=2, size=64)
    assert res["photos"] == 2 and res["images_without_face"] == {"diffusion": 0, "nearest": 0}
    assert all(-1.0 <= v <= 1.0 for v in res["identity_cosine_mean"].values())
    assert len(images) == 4 and images[0].shape == (64, 64, 3)
    assert not np.allclose(images[0], images[1])  # the fused LoRA changed the generated image
    monkeypatch.setattr(faces, "get_embedder", lambda *a, **k: Stub(fail=True))
    res = identity_similarity(syn, str(tiny_pipeline_dir), faces_dir, ("nearest",), steps=2, size=64)
    assert res["images_without_face"] == {"nearest": 2} and res["identity_cosine_mean"] == {"nearest": None}


def test_default_strategy_is_never_below_the_simple_baselines_on_validation(world_model):
    """`train hypernet` scored one sample, the average, nearest and the tuned blend on validation people
    and recorded the default; the default is not below nearest, nor below the blend when it averages."""
    meta = json.loads((world_model[1] / "model" / "hypernet" / "hypernet.json").read_text())
    d = meta["defaults"]
    v = d["validation"]
    assert set(v) == {"diffusion", "average", "nearest", "blend"} and d["validation_rows"] > 0
    assert d["blend"]["k"] in (1, 2, 4, 8, 16, 32, 64)
    best = v[d["strategy"]]
    assert best >= v["nearest"], d
    if d["strategy"] == "diffusion":  # samples stay the default only while they hold up
        assert v["diffusion"] >= v["nearest"] and v["average"] >= v["blend"], d
    else:
        assert best == max(v.values()) and meta["notes"], d
    syn = Synthesizer(world_model[1] / "model")
    assert syn.model_defaults()["blend"] == d["blend"]  # the CLI/API blend default


def test_sampling_honours_the_temperature(world_model):
    """Each sample's residual around the closed-form mean scales exactly with the temperature."""
    syn = Synthesizer(world_model[1] / "model")
    h = syn.hypernet
    e = torch.from_numpy(syn.pack.read_embeddings(syn.model.info.val_ids[:8]))
    mean = h.denormalize_latent(h.conditional_mean(h.normalize_cond(e))).repeat_interleave(4, 0)
    t0 = float(h.spread_scale.mean())
    try:
        h.spread_scale.fill_(1.0)
        one = h.sample(e, seed=5, n_samples=4) - mean
        h.spread_scale.fill_(0.5)
        half = h.sample(e, seed=5, n_samples=4) - mean
    finally:
        h.spread_scale.fill_(t0)
    torch.testing.assert_close(half, 0.5 * one, atol=1e-4 * float(one.abs().max()), rtol=1e-3)
    assert float(one.norm()) > 0


def test_average_is_the_mean_delta_w_of_real_samples(world_model):
    """The average (`--average`, closed form) against the mean delta W of 2,048 draws of the real
    sampler (not a copy of the formula): the same LoRA up to Monte Carlo and model error."""
    from lorasynth.core.delta import factor_views

    syn = Synthesizer(world_model[1] / "model")
    h = syn.hypernet
    for row in syn.model.info.val_ids[:2]:
        e = torch.from_numpy(syn.pack.read_embeddings([row]))
        draws = torch.from_numpy(syn.decode(h.sample(e, seed=11, n_samples=2048))).double()
        points = torch.from_numpy(syn.decode(h.expected_latents(e))).double()
        mean_lat = torch.from_numpy(syn.decode(h.denormalize_latent(h.conditional_mean(h.normalize_cond(e))))).double()

        def mean_delta(v):
            return torch.cat([torch.einsum("nor,nri->oi", b, a).flatten() / len(v) for b, a in factor_views(syn.layout, v)])

        mc, avg, first = mean_delta(draws), mean_delta(points), mean_delta(mean_lat)
        err_avg, err_first = float((avg - mc).norm() / mc.norm()), float((first - mc).norm() / mc.norm())
        print("relative distance to the mean of 2,048 samples: average", err_avg, "ΔW of the mean latent", err_first)
        assert err_avg < 0.08, err_avg
        assert err_avg < err_first  # the second-order term moves it towards the samples' mean


def test_evaluation_refuses_a_validation_person_in_the_test_split(world_model, tmp_path):
    _, root = world_model
    dst = _copy_model(root, tmp_path)
    model = SynthesisModel.open(dst)
    model.info.val_ids = sorted(model.info.val_ids + model.info.heldout_ids[:1])
    model.save()
    with pytest.raises(LeakError, match="validation"):
        evaluate(Synthesizer(dst), strategies=("nearest",), tune=False)


def test_one_leaked_person_is_found_with_more_rows_than_landmarks(world_model, tmp_path):
    """A single test person in the hypernetwork's training rows, with 16 landmarks for ~1,000 rows
    (the leaked row is almost surely not a landmark): the covariance's rows still give it away."""
    _, root = world_model
    dst = _copy_model(root, tmp_path)
    model = SynthesisModel.open(dst)
    train_ids, leaked = model.info.train_ids, model.info.heldout_ids[:2]  # one person, both LoRAs
    model.info.train_ids = sorted(train_ids + leaked)
    train_hypernet(model, TrainConfig(max_steps=5, batch_size=64, **QUIET), {"width": 32, "mean_landmarks": 16},
                   calibrate=False)
    model.info.train_ids = train_ids
    model.save()
    h = Synthesizer(dst).hypernet
    lm = h.landmarks
    e = torch.from_numpy(Synthesizer(dst).pack.read_embeddings(leaked))
    assert float(torch.cdist(h.normalize_cond(e), lm).min()) > 1e-5  # not among the landmarks
    with pytest.raises(LeakError, match="hypernetwork"):
        evaluate(Synthesizer(dst), strategies=("nearest",), tune=False)
    # each stored condition finds it on its own (the evaluation above stops at the first that does, so a
    # check that lost one of them would still pass it)
    from types import SimpleNamespace

    from lorasynth.synthesis.evaluation import hypernet_conditions_exclude

    none = h.cov_cond[:0]
    sources = {"residual covariance": h.cov_cond, "neighbour mean": h.nb_cond}
    assert len(h.cov_cond) >= len(model.info.train_ids)  # every training row, beyond the 16 landmarks
    for what, db in sources.items():
        if what == "neighbour mean" and not len(db):
            continue  # the neighbour mix was not chosen: nothing stored to leak through
        alone = SimpleNamespace(landmarks=h.landmarks[:0], nb_cond=db if what == "neighbour mean" else none,
                                cov_cond=db if what == "residual covariance" else none)
        with pytest.raises(LeakError, match=f"its {what}"):
            hypernet_conditions_exclude(alone, e.numpy(), "held-out")


def test_average_reaches_an_independent_kernel_ridge_in_delta_w_space(world_model, results):
    """A baseline written apart from the model's code (lorasynth.worlds.panel: kernel ridge of delta W
    on the embedding, exact solve, its own grid chosen on validation): the average is not below it
    by more than 0.01 on the test people, one sample not below nearest."""
    from lorasynth.worlds.panel import kernel_ridge_delta

    world, root = world_model
    info = SynthesisModel.open(root / "model").info
    ridge = kernel_ridge_delta(world, np.asarray(info.train_ids), np.asarray(info.val_ids), np.asarray(info.heldout_ids))
    cos = {k: v["delta_cosine_mean"] for k, v in results["strategies"].items()}
    print("independent kernel ridge:", ridge, "average:", cos["diffusion_expected"])
    assert cos["diffusion_expected"] >= ridge["delta_cosine_mean"] - 0.01, (cos, ridge)
    assert cos["diffusion"] >= cos["nearest"], cos
