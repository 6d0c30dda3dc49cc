"""Which embedder a name stands for: the factory behind ``get_embedder`` and its cache.

Above the backends (it imports them, lazily, so ``lorasynth.faces`` stays cheap to import);
the backends import only :mod:`lorasynth.faces.base`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from lorasynth.errors import LorasynthError
from lorasynth.faces.base import FaceEmbedder


def _make_dlib(model_root: str | None, **options: Any) -> FaceEmbedder:
    from lorasynth.faces.dlib_embedder import DlibEmbedder

    return DlibEmbedder(model_root=model_root, **options)


def _make_arcface(model_root: str | None, **options: Any) -> FaceEmbedder:
    from lorasynth.faces.arcface import ArcFaceEmbedder, resolve_model_root

    return ArcFaceEmbedder(model_root=resolve_model_root(model_root), **options)


_BACKENDS: dict[str, Callable[..., FaceEmbedder]] = {"dlib": _make_dlib, "arcface": _make_arcface}

#: Valid names for :func:`get_embedder` (and the CLI's ``--embedder``).
EMBEDDER_NAMES: tuple[str, ...] = tuple(_BACKENDS)

_cache: dict[tuple, FaceEmbedder] = {}
_cache_lock = threading.Lock()


def _cache_root(name: str, model_root: str | None) -> str | None:
    """The model root that identifies a cached embedder (env var resolved for arcface)."""
    if name == "arcface":
        from lorasynth.faces.arcface import resolve_model_root

        return resolve_model_root(model_root)
    return None if model_root is None else os.path.abspath(os.path.expanduser(str(model_root)))


def get_embedder(name: str = "dlib", model_root: str | os.PathLike | None = None, **options: Any) -> FaceEmbedder:
    """Return the (cached) embedder called ``name``: "dlib" (128-d) or "arcface" (512-d).

    Loading models takes seconds, so one instance is kept per (name, model root,
    options). ``options`` go to the backend constructor (e.g. ``det_size`` for
    arcface, ``upsample`` for dlib) and must be hashable.
    """
    key_name = str(name).strip().lower()
    if key_name not in _BACKENDS:
        raise LorasynthError(
            f"unknown face embedder {name!r}; valid names: {', '.join(EMBEDDER_NAMES)}"
        )
    root = None if model_root is None else str(model_root)
    key = (key_name, _cache_root(key_name, root), tuple(sorted(options.items())))
    with _cache_lock:
        emb = _cache.get(key)
        if emb is None:
            emb = _BACKENDS[key_name](key[1] if key_name == "arcface" else root, **options)
            _cache[key] = emb
        return emb


def clear_embedder_cache() -> None:
    """Forget every cached embedder (tests; or to free model memory)."""
    with _cache_lock:
        _cache.clear()
