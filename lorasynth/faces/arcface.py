"""ArcFace face embedder (512-d) through insightface on onnxruntime CPU.

insightface ships no weights, and its ``FaceAnalysis`` silently downloads a
model pack whenever the pack folder is missing. lorasynth never downloads: the
pack folder is checked first and handed to ``FaceAnalysis`` as a direct path
(which bypasses insightface's download code), and a missing model becomes a
:class:`~lorasynth.errors.FaceError` that says which files go where.

The buffalo_l models (det_10g.onnx + w600k_r50.onnx) are licensed by
insightface for non-commercial research only.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from lorasynth.errors import FaceError

from lorasynth.faces.base import Face, FaceEmbedder

#: Environment variable naming the insightface model root (holds ``models/<pack>/``).
ENV_MODEL_ROOT = "LORASYNTH_INSIGHTFACE_ROOT"
DEFAULT_PACK = "buffalo_l"

#: Detector and recognizer file names of the common insightface packs, for error messages.
KNOWN_PACK_FILES: dict[str, tuple[str, str]] = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}


def resolve_model_root(model_root: str | os.PathLike | None = None) -> str:
    """Model root: the argument, else $LORASYNTH_INSIGHTFACE_ROOT, else ~/.insightface (absolute)."""
    root = model_root if model_root is not None else os.environ.get(ENV_MODEL_ROOT) or "~/.insightface"
    return os.path.abspath(os.path.expanduser(str(root)))


def _missing_models_message(pack: str, pack_dir: Path, what: str) -> str:
    det, rec = KNOWN_PACK_FILES.get(pack, ("a detection ONNX (SCRFD)", "a recognition ONNX (ArcFace)"))
    return (
        f"ArcFace models not found ({what}): put {det} and {rec} (insightface {pack}) in {pack_dir}/ "
        f"or set {ENV_MODEL_ROOT} / --model-root; lorasynth never downloads models"
    )


class ArcFaceEmbedder(FaceEmbedder):
    """insightface detector (SCRFD) + ArcFace recognizer, CPU only.

    Args:
        model_root: folder containing ``models/<pack>/`` (see :func:`resolve_model_root`).
        pack: insightface model pack name, default "buffalo_l".
        det_size: detector input size (width, height).
        det_thresh: detector score threshold.
    """

    name = "arcface"

    def __init__(
        self,
        model_root: str | os.PathLike | None = None,
        pack: str = DEFAULT_PACK,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
    ) -> None:
        self.model_root = resolve_model_root(model_root)
        self.pack = pack
        self.pack_dir = Path(self.model_root) / "models" / pack
        if not self.pack_dir.is_dir():
            raise FaceError(_missing_models_message(pack, self.pack_dir, "folder does not exist"))
        if not any(self.pack_dir.glob("*.onnx")):
            raise FaceError(_missing_models_message(pack, self.pack_dir, "no .onnx files in the folder"))
        self._app = self._load(det_size, det_thresh)
        rec = self._app.models["recognition"]
        self.dim = self._output_dim(rec)

    def _load(self, det_size: tuple[int, int], det_thresh: float):
        """Build and prepare FaceAnalysis from the pack folder, mapping failures to FaceError."""
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:  # pragma: no cover - dependency is declared
            raise FaceError(f"the arcface embedder needs the insightface package: {exc}") from exc
        try:
            # name= an existing directory: FaceAnalysis uses it as is, never downloads.
            app = FaceAnalysis(
                name=str(self.pack_dir),
                root=self.model_root,
                allowed_modules=["detection", "recognition"],
                providers=["CPUExecutionProvider"],
            )
        except AssertionError as exc:  # FaceAnalysis asserts that a detector was found
            raise FaceError(_missing_models_message(self.pack, self.pack_dir, "no detection model recognised")) from exc
        except Exception as exc:  # corrupt / incompatible ONNX files
            raise FaceError(f"could not load the insightface models in {self.pack_dir}/: {exc}") from exc
        if "recognition" not in app.models:
            raise FaceError(_missing_models_message(self.pack, self.pack_dir, "no recognition model recognised"))
        app.prepare(ctx_id=-1, det_thresh=det_thresh, det_size=tuple(det_size))
        return app

    @staticmethod
    def _output_dim(rec) -> int:
        """Embedding size from the recognizer's output shape (run a blank chip if symbolic)."""
        last = rec.output_shape[-1] if rec.output_shape else None
        if isinstance(last, (int, np.integer)) and last > 0:
            return int(last)
        w, h = rec.input_size
        return int(np.asarray(rec.get_feat(np.zeros((h, w, 3), np.uint8))).reshape(-1).shape[0])

    def _detect(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface expects OpenCV's BGR order
        with warnings.catch_warnings():
            # insightface's face_align calls a scikit-image API deprecated in 0.26; not actionable here.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.")
            found = self._app.get(bgr)
        faces = []
        for f in found:
            if getattr(f, "embedding", None) is None:
                continue
            x0, y0, x1, y1 = (float(v) for v in f.bbox[:4])
            h, w = rgb.shape[:2]
            box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
            kps = None if f.kps is None else np.asarray(f.kps, dtype=np.float32)
            faces.append(Face(box=box, score=float(f.det_score), embedding=np.asarray(f.embedding, np.float32), landmarks=kps))
        return faces
