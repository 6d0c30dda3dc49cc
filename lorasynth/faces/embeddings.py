"""Face-embedding vectors from outside (``.npy`` sidecars, ``--embedding``, API callers): checked once, here.

An embedding is accepted only as a real, finite, non-zero 1-D numeric vector (a ``(1, D)`` batch
of one is read as its row) whose norm is within ``[MIN_NORM, MAX_NORM]``; it comes back as a
float32 unit vector. Strings, objects, structured records, booleans, complex numbers, ``.npz``
archives, 2-D matrices, NaN/Inf, zero vectors and absurd norms are one-line errors.
"""

from __future__ import annotations

import os
import tokenize
from pathlib import Path

import numpy as np

from lorasynth.errors import LorasynthError

MAX_DIM = 65_536  # face embedders use 128..512
MIN_NORM, MAX_NORM = 1e-6, 1e6  # face embedders give norms of ~0.5..30; outside this it is not an embedding
MAX_NPY_BYTES = 16 * 1024 * 1024


def check_embedding(vec, what: str = "embedding", dim: int | None = None,
                    error: type[LorasynthError] = LorasynthError) -> np.ndarray:
    """``vec`` as a float32 unit vector, or ``error`` with one line saying what is wrong with it."""
    try:
        arr = np.asarray(vec)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise error(f"{what}: not a numeric vector ({e})") from None
    kind = arr.dtype.kind
    if arr.dtype.fields is not None or kind == "V":
        raise error(f"{what}: a structured array, not a plain numeric vector")
    if kind == "c":
        raise error(f"{what}: complex values; an embedding is real")
    if kind not in "fiu":
        raise error(f"{what}: expected a numeric vector, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size == 0:
        raise error(f"{what}: expected a 1-D vector, got shape {tuple(arr.shape)}")
    if arr.size > MAX_DIM:
        raise error(f"{what}: {arr.size} dims is more than any face embedder gives ({MAX_DIM})")
    if dim is not None and arr.size != dim:
        raise error(f"{what} has {arr.size} dims, expected {dim}")
    wide = arr.astype(np.float64)
    if not np.isfinite(wide).all():
        raise error(f"{what}: holds NaN/Inf values")
    scale = float(np.abs(wide).max())
    norm = 0.0 if scale == 0.0 else scale * float(np.linalg.norm(wide / scale))  # no overflow for 1e300 entries
    if norm == 0.0:
        raise error(f"{what}: is all zeros")
    if not MIN_NORM <= norm <= MAX_NORM:
        raise error(f"{what}: norm {norm:.3g} is outside [{MIN_NORM:g}, {MAX_NORM:g}]; not a face embedding")
    return (wide / norm).astype(np.float32)


def read_embedding_npy(path: str | os.PathLike, what: str | None = None, dim: int | None = None,
                       error: type[LorasynthError] = LorasynthError) -> np.ndarray:
    """A checked unit embedding from a ``.npy`` file (never unpickled; header checked before any allocation)."""
    from lorasynth.core.safe_io import open_input

    path = Path(path)
    label = f"{path}" if what is None else f"{path} ({what})"
    with open_input(path, "embedding file", error) as (f, size):
        if size > MAX_NPY_BYTES:
            raise error(f"{label}: {size} bytes is far too large for an embedding")
        try:
            head = f.read(6)
            if head.startswith(b"PK\x03\x04"):
                raise error(f"{label}: a .npz archive; save one vector with numpy.save (.npy)")
            if head != b"\x93NUMPY":
                raise error(f"{label}: not a .npy file")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)  # validates the header dict
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise error(f"{label}: unsupported .npy version {version}")
            if dtype.hasobject:
                raise error(f"{label}: holds Python objects (a pickle); lorasynth never unpickles")
            count = 1
            for d in shape:
                count *= d
            if count * dtype.itemsize > size:
                raise error(f"{label}: truncated (header promises {shape} of {dtype})")
            f.seek(0)
            arr = np.load(f, allow_pickle=False)
        except LorasynthError:
            raise
        except (ValueError, OSError, EOFError, SyntaxError, TypeError, MemoryError, tokenize.TokenError) as e:
            raise error(f"{label}: not a plain numeric .npy array ({e})") from None
    return check_embedding(arr, label, dim, error)
