import math

import pytest
import torch

from lorasynth.core.blending import blend
from lorasynth.errors import LayoutError
from lorasynth.core.lora import LoRA, LoRAModule

from helpers import ATTN, random_lora

Q, V, CONV = f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v", "unet.conv_in"


def _inputs():
    a = random_lora({Q: (64, 48), V: (64, 40)}, rank=2, alpha=1.0, seed=1, dtype=torch.float64)
    b = random_lora({Q: (64, 48)}, rank=5, alpha=10.0, seed=2, dtype=torch.float64)  # no V: counts as 0
    c = random_lora({Q: (64, 48), V: (64, 40), CONV: (16, 4, 3, 3)}, rank=3, alpha=3.0, seed=3, dtype=torch.float64)
    return [a, b, c], [0.7, -0.2, 1.3]


def _true_sum(loras, weights, name):
    return sum(w * l.modules[name].delta(torch.float64) for l, w in zip(loras, weights) if name in l.modules)


def test_exact_blend_is_the_weighted_sum_of_updates():
    loras, weights = _inputs()
    out, report = blend(loras, weights)
    assert set(out.modules) == {Q, V, CONV}
    for name in out.modules:
        want = _true_sum(loras, weights, name)
        got = out.modules[name].delta(torch.float64)
        assert (got - want).norm() / want.norm() <= 1e-6
    assert out.modules[Q].rank == 2 + 5 + 3 and out.modules[V].rank == 2 + 3
    assert report.rank is None


def test_exact_blend_differs_from_factorwise_merging():
    # the peft/kohya 'linear' merge (sqrt(w) on each factor, added) is not the weighted sum
    loras, weights = _inputs()
    a, b = loras[0].modules[Q], loras[2].modules[Q]
    naive = (math.sqrt(0.5) * a.up[:, :2] + math.sqrt(0.5) * b.up[:, :2]) @ (
        math.sqrt(0.5) * a.down[:2] + math.sqrt(0.5) * b.down[:2])
    out, _ = blend([loras[0], loras[2]], [0.5, 0.5])
    assert not torch.allclose(naive, out.modules[Q].delta(torch.float64))


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_rank_r_blend_error_is_the_optimal_truncation_error(rank):
    loras, weights = _inputs()
    out, report = blend(loras, weights, rank=rank)
    total_disc = total = 0.0
    for name in out.modules:
        full = _true_sum(loras, weights, name).reshape(_true_sum(loras, weights, name).shape[0], -1)
        s = torch.linalg.svdvals(full)
        optimal = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
        got = out.modules[name].delta(torch.float64).reshape(full.shape)
        actual = ((got - full).norm() / full.norm()).item()
        assert report.module_errors[name] == pytest.approx(optimal, abs=1e-9)
        assert actual == pytest.approx(optimal, abs=1e-9)
        assert out.modules[name].rank == rank
        total_disc += s[rank:].square().sum().item()
        total += s.square().sum().item()
    assert report.overall_error == pytest.approx(math.sqrt(total_disc / total), abs=1e-9)


def test_rank_r_blend_is_exact_when_rank_suffices():
    loras, weights = _inputs()
    _, report = blend(loras, weights, rank=10)
    assert report.overall_error < 1e-7


def test_blend_refuses_shape_conflicts():
    a = random_lora({Q: (64, 48)}, seed=1)
    b = random_lora({Q: (64, 40)}, seed=2)
    with pytest.raises(LayoutError, match="different shapes"):
        blend([a, b], [1.0, 1.0])


def test_negative_weight_negates():
    a = random_lora({Q: (8, 6)}, seed=1, dtype=torch.float64)
    out, _ = blend([a], [-1.0])
    assert torch.allclose(out.modules[Q].delta(torch.float64), -a.modules[Q].delta(torch.float64))
