"""The canonical in-memory LoRA: modules -> (down, up, alpha), and its linear algebra.

Every function that takes a LoRA takes this object, never a raw state dict. Module
names are diffusers module paths with a component prefix:
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``.

A module's update is ``delta W = (alpha / rank) * up @ down``; for a convolution
(LoCon) ``down`` is ``(r, in, kh, kw)`` and ``up`` is ``(out, r, 1, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorasynth.errors import FormatError

COMPONENTS = ("unet", "text_encoder")


@dataclass
class LoRAModule:
    """One low-rank update: ``delta W = (alpha / rank) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim not in (2, 4) or self.up.ndim != self.down.ndim:
            raise FormatError(
                f"LoRA factors must be 2-D (Linear) or 4-D (Conv); got down {tuple(self.down.shape)}, "
                f"up {tuple(self.up.shape)}"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise FormatError(
                f"rank mismatch: down has rank {self.down.shape[0]} {tuple(self.down.shape)}, "
                f"up has rank {self.up.shape[1]} {tuple(self.up.shape)}"
            )
        if self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise FormatError(f"conv LoRA up must be 1x1, got {tuple(self.up.shape)}")
        self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Flattened input size (in_channels * kh * kw for a conv)."""
        return math.prod(self.down.shape[1:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module updates."""
        return (self.out_features, *self.down.shape[1:])

    @property
    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as 2-D matrices with the scale folded into B: ``delta W = B @ A``."""
        b = self.up.reshape(self.out_features, self.rank).to(dtype) * self.scale
        a = self.down.reshape(self.rank, -1).to(dtype)
        return b, a

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full update, shaped like the base weight."""
        b, a = self.factors(dtype)
        return (b @ a).reshape(self.weight_shape)

    def to(self, dtype: torch.dtype) -> "LoRAModule":
        return LoRAModule(self.down.to(dtype), self.up.to(dtype), self.alpha)


@dataclass
class LoRA:
    """A set of named low-rank updates plus free-form string metadata."""

    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.modules:
            if name.split(".", 1)[0] not in COMPONENTS:
                raise FormatError(f"module name {name!r} must start with one of {COMPONENTS}")

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def components(self) -> set[str]:
        return {n.split(".", 1)[0] for n in self.modules}

    def sorted(self) -> "LoRA":
        return LoRA({k: self.modules[k] for k in sorted(self.modules)}, dict(self.metadata))

    def to(self, dtype: torch.dtype) -> "LoRA":
        return LoRA({k: m.to(dtype) for k, m in self.modules.items()}, dict(self.metadata))

    def check_finite(self) -> None:
        """Raise FormatError naming the first module holding NaN or Inf."""
        for name, m in self.modules.items():
            if not math.isfinite(m.alpha):
                raise FormatError(f"module {name} has a non-finite alpha {m.alpha}")
        # fast path (~4x faster than isfinite per tensor): NaN/Inf anywhere make the sum of
        # sums non-finite; a finite sum proves every value finite. A non-finite sum from overflow
        # alone falls through to the exact per-tensor check below, which then finds nothing.
        sums = [t.sum() for m in self.modules.values() for t in (m.down, m.up)]
        if not sums or math.isfinite(torch.stack(sums).double().sum().item()):
            return
        for name, m in self.modules.items():
            for part, t in (("down", m.down), ("up", m.up)):
                if not torch.isfinite(t).all():
                    raise FormatError(f"module {name} has NaN/Inf values in its {part} weights")

    def canonical(self) -> "LoRA":
        """The same updates with canonical factors (see :func:`canonicalize_module`)."""
        return LoRA({k: canonicalize_module(m) for k, m in self.modules.items()}, dict(self.metadata))

    # ------------------------------------------------------------ files and diffusers (public API)
    def save(self, path, format: str = "kohya"):
        """Write this LoRA atomically; returns the path written.

        ``format``: ``"kohya"`` (default; A1111, ComfyUI and diffusers all read it),
        ``"diffusers"`` or ``"peft"`` (where the installed writers offer it; see
        ``lorasynth.formats.SAVE_FORMATS``).

        >>> lora.save("me.safetensors")                      # doctest: +SKIP
        >>> lora.save("me_diffusers.safetensors", format="diffusers")  # doctest: +SKIP
        """
        from lorasynth.formats import save_lora

        return save_lora(self, path, format)

    def to_diffusers(self) -> dict[str, torch.Tensor]:
        """An in-memory state dict for ``pipe.load_lora_weights(sd, adapter_name=...)``.

        Keys are diffusers' (``unet.<path>.lora_A.weight`` / ``lora_B.weight``, and
        ``text_encoder.``); every module's ``alpha / rank`` is folded into ``lora_B`` so the
        update is exact without any adapter config (diffusers then uses alpha = rank).

        >>> pipe.load_lora_weights(lora.to_diffusers(), adapter_name="me")  # doctest: +SKIP
        """
        sd: dict[str, torch.Tensor] = {}
        for name in sorted(self.modules):
            m = self.modules[name]
            sd[f"{name}.lora_A.weight"] = m.down.contiguous()
            sd[f"{name}.lora_B.weight"] = (m.up * m.scale).contiguous()
        return sd


# --------------------------------------------------------------------------- linear algebra


def factored_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``b @ a`` (out x R times R x in) without forming the product.

    QR of ``b`` and of ``a^T`` reduces the problem to an R x R core, so the cost is
    O((out + in) R^2) instead of O(out * in * min(out, in)).
    Returns ``U (out x k), S (k), Vh (k x in)`` with ``k = min(out, in, R)``.
    Works on batches too (leading dimensions), which is how blending runs many modules of
    one shape in a single call.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.mT)
    uc, s, vhc = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return qb @ uc, s, vhc @ qa.mT


def stacked_factors(parts, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = sum_i w_i dW_i`` for ``parts = [(w_i, module_i), ...]``.

    Concatenation along the rank (``B = [w1 s1 B1, w2 s2 B2, ...]``, ``A = [A1; A2; ...]``)
    is exact: the weighted sum of the updates, with no cross terms. Used by blending and
    by fusing several LoRAs into one layer.
    """
    bs, as_ = [], []
    for w, m in parts:
        b, a = m.factors(dtype)
        bs.append(b * w)
        as_.append(a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign rule: the largest-magnitude entry of every column of U is positive.

    Batched over leading dimensions (``u (..., out, k)``, ``vh (..., k, in)``): the one sign rule
    of the project (canonical LoRAs, packing, the planted worlds, PCA components).
    """
    if u.shape[-1] == 0:
        return u, vh
    idx = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, idx))  # (..., 1, k)
    signs[signs == 0] = 1
    return u * signs, vh * signs.mT


def factors_from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``B = U sqrt(S)``, ``A = sqrt(S) Vh`` truncated (or zero-padded) to ``rank``.

    Batched over leading dimensions like :func:`factored_svd`.
    """
    u, vh = fix_signs(u, vh)
    k = min(rank, s.shape[-1])
    root = s[..., :k].clamp_min(0).sqrt()
    b = u[..., :k] * root[..., None, :]
    a = root[..., :, None] * vh[..., :k, :]
    if k < rank:  # keep the requested rank so layouts stay fixed-size
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], rank - k)], dim=-1)
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], rank - k, a.shape[-1])], dim=-2)
    return b, a


def canonical_factors(b: torch.Tensor, a: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``(B, A)`` of ``delta W = b @ a`` (batched; see :func:`canonicalize_module`)."""
    u, s, vh = factored_svd(b, a)
    return factors_from_svd(u, s, vh, rank or b.shape[-1])


def module_from_factors(b: torch.Tensor, a: torch.Tensor, like: LoRAModule, dtype: torch.dtype) -> LoRAModule:
    """A module with ``delta W = b @ a`` (alpha = rank, scale 1), shaped like ``like``."""
    rank = b.shape[1]
    down_shape = (rank, *like.down.shape[1:])
    up_shape = (like.out_features, rank, *like.up.shape[2:])
    return LoRAModule(a.reshape(down_shape).to(dtype).contiguous(), b.reshape(up_shape).to(dtype).contiguous(), rank)


def canonicalize_module(m: LoRAModule, rank: int | None = None) -> LoRAModule:
    """Canonical factors of one module: a unique representative of its update.

    LoRA factors are not unique (``B R, R^-1 A`` give the same update). The canonical
    form is the SVD gauge ``delta W = U S Vh``, ``B = U sqrt(S)``, ``A = sqrt(S) Vh``,
    with the largest-magnitude entry of every column of U positive, and alpha = rank
    (the scale is folded in). Computed in float64 from the factors alone.
    """
    b, a = m.factors(torch.float64)
    u, s, vh = factored_svd(b, a)
    b2, a2 = factors_from_svd(u, s, vh, rank or m.rank)
    return module_from_factors(b2, a2, m, m.down.dtype)
