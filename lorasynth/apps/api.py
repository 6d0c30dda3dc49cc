"""Public helpers behind ``lorasynth.load_lora`` and ``lorasynth.blend`` (see ``lorasynth/__init__.py``).

Thin, typed wrappers over the internal modules, taking the shapes a user has at hand
(a path, ``[(lora, weight), ...]``) and returning plain :class:`~lorasynth.core.lora.LoRA` objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

from lorasynth.errors import LorasynthError
from lorasynth.core.lora import LoRA

LoRALike = Union[LoRA, str, os.PathLike]


def load_lora(path: str | os.PathLike, *, pipe=None) -> LoRA:
    """Read a LoRA file (kohya, diffusers or peft layout, auto-detected) into a :class:`LoRA`.

    Pickled files are refused unread. Module names resolve against SD1.5, or against ``pipe``
    (a loaded diffusers pipeline) when given, so LoRAs for fine-tunes with other module
    shapes load too.

    >>> style = lorasynth.load_lora("style.safetensors")              # doctest: +SKIP
    >>> style = lorasynth.load_lora("style.safetensors", pipe=pipe)   # doctest: +SKIP
    """
    from lorasynth.formats import load_lora as _load

    tree = None
    if pipe is not None:
        from lorasynth.runtime.apply import pipeline_tree

        tree = pipeline_tree(pipe)
    return _load(path, tree=tree)


def _as_lora(item: LoRALike) -> tuple[LoRA, str]:
    if isinstance(item, LoRA):
        return item, item.metadata.get("lorasynth.source", "")
    if isinstance(item, (str, os.PathLike)):
        return load_lora(item), Path(item).name
    raise LorasynthError(f"expected a LoRA or a path to a LoRA file, got {type(item).__name__}")


def blend(items: Sequence[tuple[LoRALike, float]], rank: int | None = None) -> LoRA:
    """The weighted sum ``sum_i w_i * dW_i`` of LoRAs, exactly (or its best rank-``rank`` approximation).

    ``items``: ``[(lora_or_path, weight), ...]``; weights may be negative. Exact by default
    (ranks add up); ``rank=r`` truncates every module optimally (SVD) and records the
    relative error in ``metadata["lorasynth.blend"]``.

    >>> mix = lorasynth.blend([(me, 0.8), (style, 0.4)])              # doctest: +SKIP
    >>> small = lorasynth.blend([(me, 1.0), ("style.safetensors", -0.3)], rank=8)  # doctest: +SKIP
    """
    from lorasynth.core.blending import blend as _blend, check_weights

    try:
        pairs = [(lora, w) for lora, w in items]
    except (TypeError, ValueError):
        raise LorasynthError("blend takes a list of (lora, weight) pairs") from None
    weights = check_weights([w for _, w in pairs])  # finite, bounded: before any file is read
    loaded = [_as_lora(lora) for lora, _ in pairs]
    out, report = _blend([lora for lora, _ in loaded], weights, rank=rank)
    info = json.loads(out.metadata["lorasynth.blend"])
    if rank is not None:
        info["overall_relative_error"] = report.overall_error
    info["sources"] = [name for _, name in loaded]
    out.metadata["lorasynth.blend"] = json.dumps(info)
    return out
