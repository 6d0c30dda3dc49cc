"""The planted synthetic world: determinism, validity, and that it is hard in the intended way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasynth.core.lora import LoRA
from lorasynth.worlds.planted import (
    SyntheticWorldConfig,
    hard_world_config,
    make_world,
    tiny_layout,
)
from lorasynth.library.splits import train_test_split
from lorasynth.core.delta import delta_cosine



@pytest.fixture(scope="module")
def world():
    return make_world(SyntheticWorldConfig(n_identities=600, layout=tiny_layout(), seed=3))


def test_tiny_layout_matches_the_tiny_unet():
    layout = tiny_layout()
    assert len(layout) == 12
    assert layout.size == 12 * (32 + 32)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in layout.names
    assert "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v" in layout.names
    assert all(m.rank == 1 for m in layout.modules)


def test_world_is_deterministic_per_seed(world):
    again = make_world(SyntheticWorldConfig(n_identities=600, layout=tiny_layout(), seed=3))
    other = make_world(SyntheticWorldConfig(n_identities=600, layout=tiny_layout(), seed=4))
    idx = [0, 17, 599]
    np.testing.assert_array_equal(world.factors, again.factors)
    np.testing.assert_array_equal(world.embeddings, again.embeddings)
    np.testing.assert_array_equal(world.vectors(idx), again.vectors(idx))
    assert not np.allclose(world.vectors(idx), other.vectors(idx))
    # rows do not depend on batching or on N
    np.testing.assert_array_equal(world.vectors(idx)[1], world.vector(17))
    smaller = make_world(SyntheticWorldConfig(n_identities=40, layout=tiny_layout(), seed=3))
    np.testing.assert_array_equal(smaller.vector(17), world.vector(17))
    np.testing.assert_allclose(smaller.embeddings[17], world.embeddings[17], atol=1e-6)


def test_embeddings_are_unit_norm_float32(world):
    e = world.embeddings
    assert e.shape == (600, 128) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # different identities are distinguishable: far from all-identical embeddings
    assert (e[:100] @ e[:100].T)[~np.eye(100, dtype=bool)].mean() < 0.5


def test_vectors_unflatten_to_valid_canonical_loras(world):
    layout = world.layout
    v = world.vectors(np.arange(5))
    assert v.shape == (5, layout.size) and v.dtype == np.float32 and np.isfinite(v).all()
    lora = world.lora(2)
    assert isinstance(lora, LoRA)
    layout.check(lora)
    lora.check_finite()
    # already canonical: flattening the LoRA again gives the same vector
    again = layout.flatten(lora, canonical=True)
    torch.testing.assert_close(again, torch.from_numpy(v[2]), atol=1e-5, rtol=1e-5)


def test_delta_cosine_matches_explicit_delta_w(world):
    layout = world.layout
    a, b = world.lora(1), world.lora(2)
    flat_a = torch.cat([a.modules[n].delta().reshape(-1) for n in layout.names]).double()
    flat_b = torch.cat([b.modules[n].delta().reshape(-1) for n in layout.names]).double()
    expected = torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0)
    got = delta_cosine(layout, world.vector(1), world.vector(2))
    assert got.shape == (1,)
    assert abs(float(got[0]) - float(expected)) < 1e-6
    assert abs(float(delta_cosine(layout, world.vector(1), world.vector(1))[0]) - 1.0) < 1e-9


def test_train_test_split():
    tr, te = train_test_split(100, 0.2, seed=1)
    assert len(te) == 20 and len(tr) == 80
    assert set(tr).isdisjoint(te) and set(tr) | set(te) == set(range(100))
    assert (np.diff(tr) > 0).all() and (np.diff(te) > 0).all()
    tr2, te2 = train_test_split(100, 0.2, seed=1)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(te, train_test_split(100, 0.2, seed=2)[1])
    assert len(train_test_split(2, 0.01)[1]) == 1
    with pytest.raises(ValueError):
        train_test_split(10, 1.5)


def test_mean_lora_is_poor_and_a_learned_model_beats_neighbours(world):
    """The world's purpose: mean << nearest/blend < a learned conditional model."""
    layout = world.layout
    tr, te = train_test_split(world.n, 0.2, seed=0)
    v = world.vectors(np.arange(world.n))
    e = world.embeddings.astype(np.float64)
    truth = v[te]
    mean_cos = delta_cosine(layout, truth, v[tr].mean(0)).mean().item()
    sim = e[te] @ e[tr].T
    nn_cos = delta_cosine(layout, truth, v[tr][sim.argmax(1)]).mean().item()
    blend_cos = 0.0
    for tau in (0.02, 0.05, 0.1):
        w = np.exp((sim - sim.max(1, keepdims=True)) / tau)
        w /= w.sum(1, keepdims=True)
        blend_cos = max(blend_cos, delta_cosine(layout, truth, w @ v[tr]).mean().item())
    # a learned model: RBF kernel ridge regression embedding -> standardised vector
    mu, sd = v[tr].mean(0), v[tr].std(0)
    kernel = np.exp(-2.0 * (2 - 2 * e[tr] @ e[tr].T))
    coef = np.linalg.solve(kernel + 1e-2 * np.eye(len(tr)), (v[tr] - mu) / sd)
    pred = np.exp(-2.0 * (2 - 2 * sim)) @ coef * sd + mu
    learned_cos = delta_cosine(layout, truth, pred).mean().item()
    assert mean_cos < 0.55, mean_cos
    assert nn_cos > mean_cos + 0.2, (nn_cos, mean_cos)
    assert blend_cos > nn_cos
    assert learned_cos > blend_cos + 0.02, (learned_cos, blend_cos)


# ---------------------------------------------------------------------------------------- hard worlds
def test_hard_world_rows_persons_and_ids():
    from lorasynth.library.splits import person_key
    from lorasynth.worlds.planted import hard_world_config

    w = make_world(hard_world_config(50, "tiny", visible_fraction=0.6, loras_per_person=3, seed=2))
    assert w.n == 150 and w.n_persons == 50 and w.embeddings.shape == (150, 128)
    assert list(w.person[:4]) == [0, 0, 0, 1]
    ids = w.ids()
    assert ids[4] == "id00001~1" and person_key(ids[4]) == "id00001" and len(set(ids)) == 150
    v = w.vectors(np.arange(6)).astype(np.float64)
    same = delta_cosine(w.layout, v[0], v[1]).item()
    other = delta_cosine(w.layout, v[0], v[3]).item()
    assert same > other + 0.2  # two LoRAs of one person are near copies: why splits go by person
    # a person's embeddings differ (one photo per LoRA) but are closer than another person's
    e = w.embeddings
    assert e[0] @ e[1] < 0.9999 and e[0] @ e[1] > e[0] @ e[3]


def test_oracle_samples_the_conditional_and_visibility_controls_difficulty():
    from lorasynth.synthesis.evaluation import sample_scores
    from lorasynth.worlds.planted import hard_world_config

    scores = {}
    for vis in (0.3, 0.95):
        w = make_world(hard_world_config(60, "tiny", visible_fraction=vis, loras_per_person=1, seed=3))
        rows = np.arange(40)
        o = w.oracle_vectors(rows, 8, seed=1)
        assert o.shape == (40, 8, w.dim) and o.dtype == np.float32
        np.testing.assert_array_equal(o, w.oracle_vectors(rows, 8, seed=1))  # deterministic per seed
        scores[vis] = sample_scores(w.layout, o.astype(np.float64), w.vectors(rows).astype(np.float64))
    # the more the embedding sees, the better the ideal sampler and the less its samples vary
    assert scores[0.95]["one_sample"] > scores[0.3]["one_sample"] + 0.2
    assert scores[0.95]["pairwise_cosine"] > scores[0.3]["pairwise_cosine"] + 0.2
    for s in scores.values():  # averaging exact samples beats one of them
        assert s["mean_of_n"] > s["one_sample"]


def test_split_by_person_keeps_every_person_on_one_side():
    from lorasynth.library.splits import persons_of, split_by_person

    ids = [f"p{i // 3}~{i % 3}" for i in range(300)] + ["solo"]
    tr, va, te = split_by_person(ids, 0.1, 0.2, seed=4)
    assert len(tr) + len(va) + len(te) == 301
    sides = [persons_of(ids, x) for x in (tr, va, te)]
    assert all(not (a & b) for i, a in enumerate(sides) for b in sides[i + 1 :])
    assert len(sides[2]) == 20 and len(sides[1]) == 10  # fractions of persons, not rows
    np.testing.assert_array_equal(te, split_by_person(ids, 0.1, 0.2, seed=4)[2])
    with pytest.raises(ValueError):
        split_by_person(ids, 0.5, 0.6)


def test_oracle_is_exact_the_truth_is_one_more_draw_of_it():
    """With photo noise, the oracle draws the visible factors from their posterior given the photo:
    the truth is distributed as one more oracle sample (a sample matches the truth as well as it
    matches another sample), and the oracle is wider than one that knows the factors themselves."""
    from lorasynth.synthesis.evaluation import sample_scores
    from lorasynth.worlds.planted import hard_world_config

    scores = {}
    for noise in (0.5, 0.0):
        w = make_world(hard_world_config(300, "tiny", visible_fraction=0.6, loras_per_person=1, seed=4, photo_noise=noise))
        assert w.config.exact_oracle
        rows = np.arange(300)
        scores[noise] = s = sample_scores(w.layout, w.oracle_vectors(rows, 8, seed=2).astype(np.float64),
                                          w.vectors(rows).astype(np.float64))
        assert abs(s["pairwise_cosine"] - s["one_sample"]) < 0.02, s
    assert scores[0.5]["pairwise_cosine"] < scores[0.0]["pairwise_cosine"] - 0.05
    assert scores[0.5]["mean_of_n"] < scores[0.0]["mean_of_n"] - 0.03
    assert not make_world(hard_world_config(10, "tiny", embed_noise=0.1)).config.exact_oracle


def test_delta_energy_score_uses_frobenius_distances_of_the_updates():
    """The energy score that chooses the hypernetwork's settings, in delta-W space, from dense updates."""
    import torch

    from lorasynth.core.delta import delta_energy_scores, factor_views
    from lorasynth.worlds.planted import tiny_layout

    lay = tiny_layout(rank=2)
    rng = np.random.default_rng(0)
    samples, truth = rng.standard_normal((3, 5, lay.size)), rng.standard_normal((3, lay.size))

    def dense(v):
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1, lay.size)
        return torch.cat([torch.einsum("nor,nri->noi", b, a).flatten(1) for b, a in factor_views(lay, v)], 1)

    want = []
    for i in range(3):
        ds, dt = dense(samples[i]), dense(truth[i])[0]
        fit = (ds - dt).norm(dim=1).mean()
        pair = torch.cdist(ds, ds).sum() / (5 * 4)
        want.append(float(fit - 0.5 * pair))
    np.testing.assert_allclose(delta_energy_scores(lay, samples, truth), want, rtol=1e-10)
    # a sampler that puts its samples on the truth scores better than one that scatters them
    assert delta_energy_scores(lay, np.repeat(truth[:, None], 5, 1), truth).mean() < delta_energy_scores(lay, samples, truth).mean()
    # the per-face cosine blocks that measure how alike one face's samples are: dense cosines
    from lorasynth.core.delta import delta_cosine_blocks

    blocks = delta_cosine_blocks(lay, samples)
    for i in range(3):
        d = dense(samples[i])
        d = d / d.norm(dim=1, keepdim=True)
        np.testing.assert_allclose(blocks[i], (d @ d.T).numpy(), atol=1e-12)


def test_look_alike_spread_recovers_the_oracle_spread_of_a_planted_world():
    """The spread target of the sampler's temperature: how alike two people with the same face
    embedding are, extrapolated from look-alike pairs, is the oracle's pairwise cosine."""
    import torch

    from lorasynth.synthesis.evaluation import sample_scores
    from lorasynth.models.hypernet.regression import look_alike_spread, top_neighbours, unit_rows
    from lorasynth.core.delta import delta_cosine_blocks

    # a line with noise: the intercept at embedding cosine 1
    g = torch.Generator().manual_seed(0)
    sims = 0.5 + 0.5 * torch.rand(200, 16, generator=g)
    value, report = look_alike_spread(sims, 0.4 - 0.3 * (1 - sims) + 0.01 * torch.randn(200, 16, generator=g))
    assert abs(value - 0.4) < 0.01 and abs(report["slope"] + 0.3) < 0.02
    # a planted world: 160 query people against the nearest LoRAs of 1,440 other people
    world = make_world(hard_world_config(1600, "tiny", visible_fraction=0.6, seed=3))
    emb, vec = torch.from_numpy(world.embeddings).float(), world.vectors(np.arange(world.n))
    person = np.asarray(world.person)
    first = np.r_[True, person[1:] != person[:-1]]  # one LoRA per query person
    q, db = np.flatnonzero((person % 10 == 0) & first), np.flatnonzero(person % 10 != 0)
    nb = top_neighbours(emb[q], emb[db], 32)
    s = (unit_rows(emb[q])[:, None] * unit_rows(emb[db])[nb]).sum(-1)
    blocks = delta_cosine_blocks(world.layout, np.concatenate([vec[q][:, None], vec[db][nb.numpy()]], axis=1))
    value, _ = look_alike_spread(s, torch.from_numpy(blocks[:, 0, 1:]))
    oracle = sample_scores(world.layout, world.oracle_vectors(q, 8).astype(np.float64), vec[q].astype(np.float64))
    print("look-alike spread", value, "oracle pairwise", oracle["pairwise_cosine"], "nearest", float(blocks[:, 0, 1].mean()))
    assert abs(value - oracle["pairwise_cosine"]) < 0.03
    assert value > float(blocks[:, 0, 1].mean()) + 0.02  # more than the nearest real neighbour says
