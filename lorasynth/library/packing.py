"""Library -> packed training matrix (:mod:`lorasynth.library.pack`): canonical flattened LoRAs + embeddings.

Entries are streamed in small batches (load blobs, canonicalize, flatten, append), so
memory stays about one batch of LoRAs plus the N x d embedding matrix, whatever the
library size. With embeddings, only entries that have one for the chosen embedder are
packed (the latent models learn embedding -> LoRA); the others are listed in the result.
A library with no embeddings at all (e.g. a w2w import) packs every entry without them.

The vectors are exactly ``layout.flatten(lora, canonical=True)`` (bit-identical, tested):
:func:`canonical_vectors` computes them for a whole batch at once (batched QR/SVD per
module instead of one small factorization per module per entry; 3-5x faster here) with
the same float64 math and sign rule as :func:`lorasynth.core.lora.canonicalize_module`.
``batch_size=1`` calls ``layout.flatten`` itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorasynth.errors import LibraryError
from lorasynth.formats.keys import kohya_name
from lorasynth.core.layout import Layout
from lorasynth.core.lora import LoRA, canonical_factors
from lorasynth.library.importers import progress_bar
from lorasynth.library.store import Library


def _canonical_module_batch(downs: torch.Tensor, ups: torch.Tensor, scales: torch.Tensor, rank: int):
    """Canonical factors of B modules at once (float64): see :func:`lorasynth.core.lora.canonicalize_module`.

    ``downs`` is (B, r, in...), ``ups`` (B, out, r...), ``scales`` (B,) = alpha / r.
    Returns (down, up) in float64 with the stacked input shapes and alpha = rank.
    """
    n, out, r = ups.shape[0], ups.shape[1], downs.shape[1]
    b = ups.reshape(n, out, r).to(torch.float64) * scales[:, None, None]
    a = downs.reshape(n, r, -1).to(torch.float64)
    bb, aa = canonical_factors(b, a, rank)  # the one canonical form (lorasynth.core.lora)
    return aa.reshape(downs.shape), bb.reshape(ups.shape)


def canonical_vectors(loras: list[LoRA], layout: Layout) -> torch.Tensor:
    """``torch.stack([layout.flatten(l, canonical=True) for l in loras])``, computed batched."""
    for lora in loras:
        layout.check(lora)
    out = torch.empty(len(loras), layout.size, dtype=torch.float32)
    for spec in layout.modules:
        mods = [lora.modules[spec.name] for lora in loras]
        downs = torch.stack([m.down for m in mods])
        ups = torch.stack([m.up for m in mods])
        scales = torch.tensor([m.scale for m in mods], dtype=torch.float64)
        down, up = _canonical_module_batch(downs, ups, scales, spec.rank)
        for j, m in enumerate(mods):  # round through each entry's own dtype, as flatten does
            if m.down.dtype != torch.float32:
                down[j], up[j] = down[j].to(m.down.dtype).to(torch.float64), up[j].to(m.down.dtype).to(torch.float64)
        _put(out, layout, spec, down, up)
    return out


def _put(out: torch.Tensor, layout: Layout, spec, down: torch.Tensor, up: torch.Tensor) -> None:
    off, nd = layout.offsets[spec.name], math.prod(spec.down_shape)
    out[:, off : off + nd] = down.reshape(len(out), -1)
    out[:, off + nd : off + spec.size] = up.reshape(len(out), -1)


# --------------------------------------------------------------------------- raw blob batches

_PLANS: dict[bytes, list | None] = {}


def _blob_plan(header: bytes, layout: Layout) -> list | None:
    """Float32 element offsets ``[(spec, down, up, alpha)]`` of every module in a blob data
    section with this header, or None if the blob is not all-float32 / does not fit."""
    if header in _PLANS:
        return _PLANS[header]
    plan: list | None = []
    try:
        info = json.loads(header)
        for spec in layout.modules:
            k = kohya_name(spec.name)
            parts = []
            for key, shape in ((f"{k}.lora_down.weight", spec.down_shape), (f"{k}.lora_up.weight", spec.up_shape),
                               (f"{k}.alpha", ())):
                t = info[key]
                start, end = t["data_offsets"]
                if t["dtype"] != "F32" or tuple(t["shape"]) != tuple(shape) or start % 4 or end - start != 4 * math.prod(shape):
                    raise ValueError(key)
                parts.append(start // 4)
            plan.append((spec, *parts))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError, RecursionError):  # the slow path says why
        plan = None
    if len(_PLANS) > 16:
        _PLANS.clear()
    _PLANS[header] = plan
    return plan


def _canonical_from_blobs(blobs: list[bytes], layout: Layout) -> torch.Tensor | None:
    """Canonical vectors straight from raw blob bytes sharing one all-float32 header (no LoRA objects).

    Same numbers as :func:`canonical_vectors` on the decoded LoRAs; None when the blobs do
    not share a usable header (the caller then decodes them one by one).
    """
    (n,) = struct.unpack("<Q", blobs[0][:8])
    header = blobs[0][8 : 8 + n]
    if any(b[8 : 8 + n] != header for b in blobs[1:]):
        return None
    plan = _blob_plan(header, layout)
    if plan is None or (len(blobs[0]) - 8 - n) % 4:
        return None
    cols = (len(blobs[0]) - 8 - n) // 4
    if any(max(d + math.prod(s.down_shape), u + math.prod(s.up_shape), a + 1) > cols for s, d, u, a in plan):
        return None  # offsets past the data (a crafted blob): decode_blob reports it
    data = np.empty((len(blobs), (len(blobs[0]) - 8 - n) // 4), dtype=np.float32)
    for i, b in enumerate(blobs):
        if len(b) != len(blobs[0]):
            return None
        data[i] = np.frombuffer(b, dtype=np.float32, offset=8 + n)
    out = torch.empty(len(blobs), layout.size, dtype=torch.float32)
    for spec, down_at, up_at, alpha_at in plan:
        nd, nu = math.prod(spec.down_shape), math.prod(spec.up_shape)
        downs = torch.from_numpy(data[:, down_at : down_at + nd]).reshape(len(blobs), *spec.down_shape)
        ups = torch.from_numpy(data[:, up_at : up_at + nu]).reshape(len(blobs), *spec.up_shape)
        scales = torch.from_numpy(data[:, alpha_at].astype(np.float64)) / spec.rank
        down, up = _canonical_module_batch(downs, ups, scales, spec.rank)
        _put(out, layout, spec, down, up)
    return out


@dataclass
class PackResult:
    """What :func:`pack_library` wrote."""

    out_dir: Path
    entries: int
    embedder: str  # "" when the pack holds no embeddings
    embed_dim: int
    vector_size: int
    skipped_without_embedding: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        skipped = len(self.skipped_without_embedding)
        note = (f"; skipped {skipped} entr{'y' if skipped == 1 else 'ies'} without a [{self.embedder}] embedding"
                if skipped else "")
        emb = f" + {self.embed_dim}-d [{self.embedder}] embedding" if self.embed_dim else " (no embeddings)"
        return (f"packed {self.entries} entries ({self.vector_size} values{emb} each) into {self.out_dir} "
                f"in {self.seconds:.1f}s{note}")


@contextmanager
def _torch_threads(n: int):
    """Temporarily limit torch's intra-op threads (tiny batched factorizations: threads only add overhead)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pack_library(
    lib: Library,
    out_dir: str | os.PathLike,
    embedder: str | None = None,
    progress: bool = True,
    batch_size: int = 32,
    overwrite: bool = False,
) -> PackResult:
    """Write every entry's canonical vector (``layout.flatten(lora, canonical=True)``) and its
    face embedding to a pack (:class:`lorasynth.library.pack.PackWriter`) in ``out_dir``.

    Which embeddings: ``embedder`` names them (default: the library's embedder). Entries
    without that embedding are skipped (and listed in the result). If no entry has one
    (e.g. a w2w import) and ``embedder`` was not given, or ``embedder=""``, every entry is
    packed without embeddings (enough for PCA-style models).

    The entry set is fixed when packing starts; an entry removed meanwhile is an error
    (the pack would not match the library), an entry added meanwhile is simply not packed.
    Memory: one batch of LoRAs plus the N x d embedding matrix.
    """
    from lorasynth.library.pack import PackWriter

    t0 = time.perf_counter()
    name = lib.embedder if embedder is None else embedder
    ids_arr, matrix = (lib.embeddings(name) if name else (None, None))
    if name and len(ids_arr) == 0:
        if embedder:
            raise LibraryError(f"no entry has a [{name}] embedding: nothing to pack (add photos or .npy embeddings, "
                               "or pack without embeddings with embedder='')")
        name = ""
    if name:
        ids = [int(i) for i in ids_arr]
        with_emb = set(ids)
        skipped = [i for i in lib.ids() if i not in with_emb]
        embed_dim = int(matrix.shape[1])
    else:
        ids, skipped, embed_dim, matrix = lib.ids(), [], 0, None
    if not ids:
        raise LibraryError(f"{lib.root}: the library is empty; nothing to pack")
    layout = lib.layout
    step = max(1, int(batch_size))
    bar = progress_bar(None, progress, len(ids), "pack", "lora") if progress else None
    meta = {"library": str(lib.root), "base_model": lib.base_model}
    with _torch_threads(1), PackWriter(out_dir, layout, len(ids), embed_dim, name, overwrite=overwrite, meta=meta) as writer:
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            entries = []
            for entry_id in chunk:
                try:
                    entries.append(lib.resolve(entry_id))
                except LibraryError:
                    raise LibraryError(f"entry {entry_id} was removed while packing; pack again") from None
            vectors = None
            if step > 1:  # fast path: hash-checked raw bytes -> batched canonical factors
                vectors = _canonical_from_blobs([lib.read_blob(e) for e in entries], layout)
            if vectors is None:
                loras = [lib.load(e) for e in entries]
                vectors = layout.flatten(loras[0], canonical=True)[None] if step == 1 else canonical_vectors(loras, layout)
            emb = matrix[start : start + len(chunk)] if embed_dim else None
            writer.add_batch(vectors.numpy(), emb, [str(i) for i in chunk])
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return PackResult(Path(out_dir), len(ids), name, embed_dim, layout.size, skipped, time.perf_counter() - t0)
