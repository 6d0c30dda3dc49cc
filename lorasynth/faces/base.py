"""The face-embedder contract shared by every backend, plus the cached factory.

A backend only implements :meth:`FaceEmbedder._detect` (find faces in an RGB
array and embed each). This base class owns everything callers rely on being
identical across backends: input loading, largest-first ordering, L2
normalisation, face selection by index, and the error messages.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from lorasynth.errors import FaceError

from lorasynth.faces.images import DEFAULT_MAX_PIXELS, ImageInput, describe_source, load_image_scaled, read_rgb


@dataclass(eq=False)
class Face:
    """One detected face.

    ``box`` is (x0, y0, x1, y1) in pixels of the (upright) input image, ``score``
    the detector's confidence (scale is backend-specific), ``embedding`` a float32
    unit vector of the embedder's ``dim``, ``landmarks`` an optional K x 2 array
    of the detector's keypoints (5 points for both backends).
    """

    box: tuple[float, float, float, float]
    score: float
    embedding: np.ndarray
    landmarks: np.ndarray | None = None

    @property
    def area(self) -> float:
        """Box area in pixels (the ordering key: larger faces come first)."""
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True, eq=False)
class FaceSelection:
    """Which face :meth:`FaceEmbedder.embed_with_report` used, out of how many.

    Lets a CLI say "3 faces found, used the largest (index 0)".
    """

    face: Face
    index: int
    n_faces: int

    def describe(self) -> str:
        """One-line human summary, e.g. '3 faces found, used the largest (index 0)'."""
        found = "1 face found" if self.n_faces == 1 else f"{self.n_faces} faces found"
        which = "the largest" if self.index == 0 else f"the {_ordinal(self.index + 1)} largest"
        return f"{found}, used {which} (index {self.index})"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def l2_normalize(vec: np.ndarray) -> np.ndarray:
    """Return ``vec`` as a float32 unit vector; a zero / non-finite vector is a FaceError.

    IP-Adapter-FaceID style conditioning expects unit-norm embeddings, and cosine
    similarity then is a plain dot product.
    """
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise FaceError("face embedder returned a degenerate (zero or non-finite) embedding")
    return v / np.float32(norm)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (normalises both, so any scale works)."""
    return float(np.dot(l2_normalize(a), l2_normalize(b)))


class FaceEmbedder(ABC):
    """Detects faces in a photo and maps each to an identity embedding.

    Subclasses set ``name`` and ``dim`` and implement :meth:`_detect`.
    """

    name: str = ""
    dim: int = 0
    #: Pixel limit used when a path is given (see :func:`lorasynth.faces.images.load_image`).
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @abstractmethod
    def _detect(self, rgb: np.ndarray) -> list[Face]:
        """Find and embed every face in a contiguous H x W x 3 uint8 RGB array (any order)."""

    def detect_and_embed(self, image: ImageInput) -> list[Face]:
        """All faces in ``image`` (path or array), largest box first, embeddings unit-norm."""
        if isinstance(image, (str, os.PathLike)):  # big photos are decoded smaller (bounded memory)
            rgb, (sx, sy) = load_image_scaled(image, max_pixels=self.max_pixels)
        else:
            rgb, (sx, sy) = read_rgb(image, max_pixels=self.max_pixels), (1.0, 1.0)
        faces = self._detect(rgb)
        for f in faces:
            f.embedding = l2_normalize(f.embedding)
            if (sx, sy) != (1.0, 1.0):  # back to pixels of the full-size image
                x0, y0, x1, y1 = f.box
                f.box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
                if f.landmarks is not None:
                    f.landmarks = np.asarray(f.landmarks, dtype=np.float64) * np.array([sx, sy])
        # Ties (equal areas) are broken by score, then left-to-right, for determinism.
        faces.sort(key=lambda f: (-f.area, -f.score, f.box[0], f.box[1]))
        return faces

    def embed_with_report(self, image_or_path: ImageInput, face_index: int | None = None) -> FaceSelection:
        """Embed one face and report which one was used and how many were found.

        ``face_index`` indexes the largest-first ordering (default 0, the largest).
        """
        source = describe_source(image_or_path)
        faces = self.detect_and_embed(image_or_path)
        if not faces:
            raise FaceError(f"no face found in {source} (embedder: {self.name})")
        index = 0 if face_index is None else int(face_index)
        if not 0 <= index < len(faces):
            found = "1 face was" if len(faces) == 1 else f"{len(faces)} faces were"
            raise FaceError(
                f"face index {face_index} is out of range for {source}: {found} found "
                f"(valid indices 0..{len(faces) - 1}, largest first)"
            )
        return FaceSelection(face=faces[index], index=index, n_faces=len(faces))

    def embed(self, image_or_path: ImageInput, face_index: int | None = None) -> Face:
        """The largest face in the image (or the ``face_index``-th largest)."""
        return self.embed_with_report(image_or_path, face_index).face

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"
