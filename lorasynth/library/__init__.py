"""A LoRA library: a SQLite manifest + content-addressed LoRA blobs + face embeddings.

    from lorasynth.library import Library
    lib = Library.create("lib", "runwayml/stable-diffusion-v1-5", Layout.w2w(), embedder="dlib")
    r = lib.add(lora, "alice", embeddings={"dlib": vec})   # AddResult(id, name, duplicate)
    entry, lora = lib.get("alice")
    lib.nearest(query_vec, "dlib", k=5)                     # cosine, cached matrix
    import_folder(lib, "loras/"); import_w2w(lib, "w2w/", 0, 1000)
    pack_library(lib, "packed/")                            # training matrix for the latent models

See :mod:`lorasynth.library.store` for the on-disk layout and the crash/concurrency rules.
"""

from __future__ import annotations

import importlib

# every name loads its module on first use: `lorasynth --help` imports the light
# train_config module from here without pulling in torch through the store and importers
_LAZY = {
    **dict.fromkeys(("ImportReport", "embed_photos", "import_folder", "import_w2w", "scan_folder"), "importers"),
    **dict.fromkeys(("AddResult", "Entry", "Library", "LibraryConfig", "Neighbor", "NewEntry", "VerifyReport",
                     "blob_bytes", "clean_embedding"), "store"),
    **dict.fromkeys(("pack_library", "PackResult"), "packing"),
}

__all__ = [
    "AddResult",
    "Entry",
    "ImportReport",
    "Library",
    "LibraryConfig",
    "Neighbor",
    "NewEntry",
    "PackResult",
    "VerifyReport",
    "blob_bytes",
    "clean_embedding",
    "embed_photos",
    "import_folder",
    "import_w2w",
    "pack_library",
    "scan_folder",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
