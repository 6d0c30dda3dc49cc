"""Layout: the ordered list of modules (and shapes, ranks) a flattened LoRA vector holds.

A library, a packed training matrix and every latent model are tied to one Layout.
``flatten``/``unflatten`` move between a :class:`~lorasynth.core.lora.LoRA` and one 1-D
vector: per module, ``down`` (lora_A) flattened, then ``up`` (lora_B) flattened, modules
in the layout's order (sorted names by default, as the weights2weights rows are).
The signature is a stable hash of the JSON form.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from lorasynth.errors import LayoutError
from lorasynth.core.lora import LoRA, LoRAModule, canonicalize_module
from lorasynth.core.sd15 import SD15_ATTENTION_BLOCKS, sd15_module_shapes

W2W_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")
W2W_ALPHA = 27.0
MAX_LAYOUT_DIM = 1 << 16  # SD-family weights have dims <= 5120
MAX_LAYOUT_SIZE = 1 << 31  # values in one flat vector


@dataclass(frozen=True)
class ModuleSpec:
    """One module of a layout: its name and the exact shapes of its factors."""

    name: str
    down_shape: tuple[int, ...]  # (r, in) or (r, in, kh, kw)
    up_shape: tuple[int, ...]  # (out, r) or (out, r, 1, 1)

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def size(self) -> int:
        return math.prod(self.down_shape) + math.prod(self.up_shape)

    @classmethod
    def for_weight(cls, name: str, weight_shape: tuple[int, ...], rank: int) -> "ModuleSpec":
        """Spec of a rank-``rank`` LoRA on a weight of ``weight_shape`` (Linear or Conv)."""
        out, rest = weight_shape[0], tuple(weight_shape[1:])
        up_tail = (1, 1) if len(rest) == 3 else ()
        return cls(name, (rank, *rest), (out, rank, *up_tail))


@dataclass(frozen=True)
class Layout:
    """Ordered module specs; defines the flat vector every library entry becomes."""

    modules: tuple[ModuleSpec, ...]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_lora(cls, lora: LoRA) -> "Layout":
        return cls(
            tuple(
                ModuleSpec(n, tuple(lora.modules[n].down.shape), tuple(lora.modules[n].up.shape))
                for n in sorted(lora.modules)
            )
        )

    @classmethod
    def for_targets(
        cls, shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int
    ) -> "Layout":
        """All modules of ``shapes`` whose name ends with one of ``targets``, at one rank."""
        names = sorted(n for n in shapes if n.endswith(tuple("." + t for t in targets)))
        if not names:
            raise LayoutError(f"no module matches targets {targets}")
        return cls(tuple(ModuleSpec.for_weight(n, shapes[n], rank) for n in names))

    @classmethod
    def w2w(cls) -> "Layout":
        """The weights2weights layout: rank-1 to_q/to_v LoRA on SD1.5's 16 transformer blocks."""
        shapes = sd15_module_shapes()
        names = [
            f"unet.{block}.transformer_blocks.0.{t}" for block in SD15_ATTENTION_BLOCKS for t in W2W_TARGETS
        ]
        return cls(tuple(ModuleSpec.for_weight(n, shapes[n], 1) for n in sorted(names)))

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        return {
            "version": 1,
            "modules": [[m.name, list(m.down_shape), list(m.up_shape)] for m in self.modules],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        """A layout from its JSON form, checked strictly (layouts come from files others made)."""
        if not isinstance(d, dict) or d.get("version") != 1 or not isinstance(d.get("modules"), list) or not d["modules"]:
            raise LayoutError("not a lorasynth layout (expected version 1 with a non-empty 'modules' list)")
        specs, total = [], 0
        for item in d["modules"]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and all(isinstance(s, list) and 2 <= len(s) <= 4 for s in item[1:])
                    and all(type(x) is int and 1 <= x <= MAX_LAYOUT_DIM for s in item[1:] for x in s)):
                raise LayoutError(f"malformed layout module {str(item)[:120]} (expected [name, down shape, up shape] "
                                  f"with dimensions 1..{MAX_LAYOUT_DIM})")
            spec = ModuleSpec(item[0], tuple(item[1]), tuple(item[2]))
            if spec.down_shape[0] != spec.up_shape[1]:
                raise LayoutError(f"layout module {spec.name}: down rank {spec.down_shape[0]} != up rank {spec.up_shape[1]}")
            total += spec.size
            if total > MAX_LAYOUT_SIZE:
                raise LayoutError(f"layout holds more than {MAX_LAYOUT_SIZE} values; refusing it")
            specs.append(spec)
        if len({s.name for s in specs}) != len(specs):
            raise LayoutError("layout names a module twice")
        return cls(tuple(specs))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "Layout":
        from lorasynth.core.safe_io import parse_json

        return cls.from_dict(parse_json(s, "layout", dict, error=LayoutError))

    @cached_property
    def signature(self) -> str:
        """Stable 16-hex-digit hash of the layout (names, shapes, order)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- geometry
    @cached_property
    def size(self) -> int:
        """Length of a flattened vector."""
        return sum(m.size for m in self.modules)

    @cached_property
    def offsets(self) -> dict[str, int]:
        """Start of each module's slice in the flat vector."""
        out, pos = {}, 0
        for m in self.modules:
            out[m.name] = pos
            pos += m.size
        return out

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    def __len__(self) -> int:
        return len(self.modules)

    # ---------------------------------------------------------------- checks
    def mismatch(self, lora: LoRA) -> str | None:
        """Why ``lora`` does not fit this layout, or None when it does."""
        have, want = set(lora.modules), set(self.names)
        problems = []
        if missing := sorted(want - have):
            problems.append(f"{len(missing)} module(s) missing (e.g. {', '.join(missing[:3])})")
        if extra := sorted(have - want):
            problems.append(f"{len(extra)} module(s) not in the layout (e.g. {', '.join(extra[:3])})")
        for spec in self.modules:
            m = lora.modules.get(spec.name)
            if m is not None and (tuple(m.down.shape), tuple(m.up.shape)) != (spec.down_shape, spec.up_shape):
                problems.append(
                    f"{spec.name}: factors down {tuple(m.down.shape)} / up {tuple(m.up.shape)}, "
                    f"layout expects {spec.down_shape} / {spec.up_shape}"
                )
                break
        return "; ".join(problems) or None

    def check(self, lora: LoRA) -> None:
        if (why := self.mismatch(lora)) is not None:
            raise LayoutError(f"LoRA does not fit layout {self.signature}: {why}")

    # ---------------------------------------------------------------- flatten
    def flatten(self, lora: LoRA, canonical: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One vector: per module, down then up, in layout order.

        ``canonical=True`` (for learning) stores the canonical factors with the scale
        folded in (alpha = rank); ``canonical=False`` stores the raw factors and drops
        alpha (as weights2weights rows do: their alpha is a constant of the layout).
        """
        self.check(lora)
        parts = []
        for spec in self.modules:
            m = lora.modules[spec.name]
            if canonical:
                m = canonicalize_module(m)
            parts += [m.down.reshape(-1).to(dtype), m.up.reshape(-1).to(dtype)]
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor, alpha: float | None = None) -> LoRA:
        """Inverse of :meth:`flatten`; ``alpha`` None means alpha = rank (scale 1)."""
        vector = torch.as_tensor(vector)
        if vector.ndim != 1 or vector.shape[0] != self.size:
            raise LayoutError(f"vector of shape {tuple(vector.shape)} does not match layout size {self.size}")
        modules, pos = {}, 0
        for spec in self.modules:
            nd, nu = math.prod(spec.down_shape), math.prod(spec.up_shape)
            down = vector[pos : pos + nd].reshape(spec.down_shape).clone()
            up = vector[pos + nd : pos + nd + nu].reshape(spec.up_shape).clone()
            modules[spec.name] = LoRAModule(down, up, spec.rank if alpha is None else alpha)
            pos += nd + nu
        return LoRA(modules)
