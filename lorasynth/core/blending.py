"""Linear blending of LoRAs: the true weighted sum of their updates, exact or at a target rank.

peft's ``add_weighted_adapter(combination_type="linear")`` and kohya's merge scale the two
factors separately and add them, which creates cross terms: the result is *not*
``sum_i w_i dW_i`` and negative weights misbehave. Here:

* exact mode concatenates along the rank: ``B = [w1 s1 B1, w2 s2 B2, ...]``,
  ``A = [A1; A2; ...]`` so ``B @ A = sum_i w_i dW_i`` to rounding (ranks add up);
* ``rank=r`` mode takes the SVD of that factored sum (QR of B and A^T first, so the
  full ``out x in`` update is never formed) and keeps the top r singular triplets —
  the optimal rank-r approximation (Eckart-Young). The relative Frobenius error per
  module is ``sqrt(sum of discarded s^2) / sqrt(sum of all s^2)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Sequence

import torch

from lorasynth.errors import InputError, LayoutError, LorasynthError
from lorasynth.core.numbers import parse_float, parse_int
from lorasynth.core.lora import LoRA, LoRAModule, factored_svd, factors_from_svd, module_from_factors, stacked_factors


@dataclass
class BlendReport:
    """Relative Frobenius error of a rank-truncated blend, per module and overall."""

    rank: int | None
    module_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    requested_rank: int | None = None  # when larger than any module can hold, ``rank`` is the cap

    @property
    def max_error(self) -> float:
        return max(self.module_errors.values(), default=0.0)

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "overall_relative_error": self.overall_error,
            "max_module_relative_error": self.max_error,
            "module_relative_errors": self.module_errors,
        }


#: the largest |weight| a blend takes: LoRA strengths are O(1); 1e308 overflowed to NaN LoRAs
MAX_BLEND_WEIGHT = 1000.0


def check_weights(weights: Sequence[float]) -> list[float]:
    """Blend weights as floats: finite and in ``[-MAX_BLEND_WEIGHT, MAX_BLEND_WEIGHT]``, else one InputError line."""
    return [parse_float(w, f"blend weight {i + 1}", minimum=-MAX_BLEND_WEIGHT, maximum=MAX_BLEND_WEIGHT)
            for i, w in enumerate(weights)]


def blend(
    loras: Sequence[LoRA],
    weights: Sequence[float],
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[LoRA, BlendReport]:
    """``sum_i weights[i] * dW_i`` over the union of modules (a module absent from a LoRA counts as 0).

    ``rank=None`` is exact (output rank per module = sum of input ranks). ``rank=r``
    truncates each module to rank r optimally and reports the error; an ``r`` above what
    any module can hold (``min(sum of input ranks, out, in)``) is capped there, since the
    rest would be zero padding (``report.requested_rank`` keeps the request). Output factors
    have alpha = rank (scale 1); ``dtype`` defaults to the promoted input dtype.
    """
    try:
        n_weights = len(weights)
    except TypeError:
        raise InputError("blend weights must be a list of numbers") from None
    if len(loras) != n_weights or not loras:
        raise LorasynthError("blend needs one weight per LoRA and at least one LoRA")
    weights = check_weights(weights)
    if rank is not None:
        rank = parse_int(rank, "rank", minimum=1)
    all_dtypes = [m.down.dtype for lora in loras for m in lora.modules.values()]
    out_dtype = dtype or reduce(torch.promote_types, all_dtypes, torch.float32)
    work_dtype = torch.float64 if rank is not None else out_dtype

    names = sorted(set().union(*(lora.modules for lora in loras)))
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor, LoRAModule]] = {}
    for name in names:
        parts = [(float(w), lora.modules[name]) for lora, w in zip(loras, weights) if name in lora.modules]
        shapes = {p[1].weight_shape for p in parts}
        if len(shapes) > 1:
            raise LayoutError(f"cannot blend module {name}: the LoRAs update weights of different shapes {sorted(shapes)}")
        b, a = stacked_factors(parts, work_dtype)
        stacked[name] = (b, a, parts[0][1])
    if rank is None:
        modules = {n: module_from_factors(b, a, like, out_dtype) for n, (b, a, like) in stacked.items()}
        return LoRA(modules, _blend_metadata(weights, rank)), BlendReport(rank)
    requested = rank
    rank = min(rank, max(min(b.shape[0], b.shape[1], a.shape[1]) for b, a, _ in stacked.values()))

    # truncation: one batched QR/SVD per group of modules with equal factor shapes
    groups: dict[tuple, list[str]] = {}
    for n, (b, a, _) in stacked.items():
        groups.setdefault((tuple(b.shape), tuple(a.shape)), []).append(n)
    modules = {}
    report = BlendReport(rank, requested_rank=requested if requested != rank else None)
    discarded_sq = total_sq = 0.0
    for group in groups.values():
        u, s, vh = factored_svd(torch.stack([stacked[n][0] for n in group]), torch.stack([stacked[n][1] for n in group]))
        s2 = s.square()
        totals, kept = s2.sum(dim=1).tolist(), s2[:, :rank].sum(dim=1).tolist()
        for i, n in enumerate(group):
            lost = max(totals[i] - kept[i], 0.0)
            report.module_errors[n] = math.sqrt(lost / totals[i]) if totals[i] > 0 else 0.0
            discarded_sq += lost
            total_sq += totals[i]
            b2, a2 = factors_from_svd(u[i], s[i], vh[i], rank)
            modules[n] = module_from_factors(b2, a2, stacked[n][2], out_dtype)
    report.overall_error = math.sqrt(discarded_sq / total_sq) if total_sq > 0 else 0.0
    modules = {n: modules[n] for n in names}
    return LoRA(modules, _blend_metadata(weights, rank)), report


def _blend_metadata(weights: Sequence[float], rank: int | None) -> dict[str, str]:
    return {"lorasynth.blend": json.dumps({"weights": [float(w) for w in weights], "rank": rank})}
