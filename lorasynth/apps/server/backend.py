"""The web app's only door into lorasynth: every call the server makes goes through here.

The routes (``routes/``) speak HTTP and JSON; this adapter speaks lorasynth (Synthesizer,
faces, blend, formats, library, apply + pipeline). Switching the server to another API
(e.g. the public ``lorasynth`` facade) means editing this one file.

Thread safety: routes run in a thread pool. Synthesis is pure tensor math on loaded,
read-only models and runs concurrently; face detection and the library's SQLite connection
are serialized with locks; generation runs on the single worker of :mod:`.jobs`.
"""

from __future__ import annotations

import io
import tempfile
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lorasynth.apps.server.config import ServerConfig
from lorasynth.errors import ImageError, LibraryError, LorasynthError, ModelError
from lorasynth.synthesis.latent_map import LatentMap, library_map, project_vectors

#: The prompt the preview starts from (the DreamBooth-style trigger the library LoRAs use).
TRIGGER_PROMPT = "a photo of sks person"


@dataclass
class FaceInfo:
    index: int
    box: tuple[float, float, float, float]
    score: float
    embedding: list[float]


class Backend:
    """Loaded models (synthesis model, optional base pipeline, optional library) for one server."""

    def __init__(self, cfg: ServerConfig):
        from lorasynth.synthesis.synthesizer import Synthesizer

        self.cfg = cfg
        self.syn = Synthesizer(cfg.model, model_root=cfg.model_root)
        self.info = self.syn.model.info
        self._face_lock = threading.Lock()
        self._lib_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._map: LatentMap | None = None
        self.library = None
        if cfg.library:
            from lorasynth.library import Library

            self.library = Library.open(cfg.library)
        self.pipe = None
        self.base_is_tiny = False
        if cfg.base:
            from lorasynth.runtime.pipeline import load_pipeline
            from lorasynth.worlds.tiny_sd import read_tiny_marker

            self.pipe = load_pipeline(str(cfg.base))
            self.base_is_tiny = Path(cfg.base).is_dir() and read_tiny_marker(cfg.base) is not None

    # ---------------------------------------------------------------- lifecycle
    def warm_up(self) -> None:
        """Load every lazy part now, so the first request is fast and threads never race to load."""
        _ = self.syn.pack, self.syn.latent, self.syn.model_hash, self.syn.library_embeddings()
        if self.info.has_hypernet:
            _ = self.syn.hypernet
        if self.can_embed_photos:
            from lorasynth.faces import get_embedder

            get_embedder(self.info.embedder, model_root=self.cfg.model_root)

    def close(self) -> None:
        if self.library is not None:
            with self._lib_lock:
                self.library.close()

    # ---------------------------------------------------------------- facts
    @property
    def can_embed_photos(self) -> bool:
        return self.info.embedder in ("dlib", "arcface")

    @property
    def strategies(self) -> list[str]:
        from lorasynth.synthesis.synthesizer import STRATEGIES

        return [s for s in STRATEGIES if s != "sample" and (s != "diffusion" or self.info.has_hypernet)]

    @property
    def save_formats(self) -> list[str]:
        from lorasynth.formats import SAVE_FORMATS

        return list(SAVE_FORMATS)

    @property
    def schedulers(self) -> list[str]:
        from lorasynth.runtime.pipeline import SCHEDULERS

        return list(SCHEDULERS)

    def describe(self) -> dict:
        return {
            "model": Path(self.cfg.model).name,
            "embedder": self.info.embedder,
            "embed_dim": self.info.embed_dim,
            "strategies": self.strategies,
            "formats": self.save_formats,
            "has_base": self.pipe is not None,
            "base_is_random_weights": self.base_is_tiny,
            "has_library": self.library is not None,
            "schedulers": self.schedulers if self.pipe is not None else [],
            "trigger_prompt": TRIGGER_PROMPT,
            "limits": {"upload_bytes": self.cfg.max_upload_bytes, "pixels": self.cfg.max_pixels,
                       "queue": self.cfg.queue_size, "steps": self.cfg.max_steps, "side": self.cfg.max_side,
                       "samples": self.cfg.max_samples},
        }

    # ---------------------------------------------------------------- images and faces
    def decode_image(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """Upload bytes -> upright H x W x 3 uint8 RGB, with the pixel limit checked before decoding."""
        from PIL import Image, ImageOps

        from lorasynth.faces.images import check_size, pil_to_rgb

        if not data:
            raise ImageError("the upload is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    check_size(Path("the upload"), im.size, max_pixels or self.cfg.max_pixels)
                    im.seek(0)
                    im.load()
                    im = ImageOps.exif_transpose(im) or im
                    return pil_to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"the upload is too large to decode safely ({exc})") from None
        except ImageError:
            raise
        except Image.UnidentifiedImageError:
            raise ImageError("the upload is not an image (no format Pillow reads: JPEG, PNG, WebP, ...)") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            raise ImageError(f"the upload is not a readable image: {exc}") from None

    def detect_faces(self, rgb: np.ndarray) -> list[FaceInfo]:
        """Every face, largest first, with its box and unit embedding from the model's embedder."""
        from lorasynth.faces import get_embedder

        if not self.can_embed_photos:
            raise ModelError(f"this model was trained on '{self.info.embedder}' embeddings; it cannot embed photos "
                             f"(send an embedding instead)")
        embedder = get_embedder(self.info.embedder, model_root=self.cfg.model_root)
        with self._face_lock:
            faces = embedder.detect_and_embed(rgb)
        return [FaceInfo(i, tuple(round(float(v), 1) for v in f.box), float(f.score),
                         [float(x) for x in f.embedding]) for i, f in enumerate(faces)]

    def face_embedding(self, rgb: np.ndarray, face_index: int) -> tuple[np.ndarray, FaceInfo, int]:
        from lorasynth.errors import FaceError

        faces = self.detect_faces(rgb)
        if not faces:
            raise FaceError("no face found in the upload")
        if not 0 <= face_index < len(faces):
            raise FaceError(f"face index {face_index} is out of range: {len(faces)} face(s) found "
                            f"(valid 0..{len(faces) - 1}, largest first)")
        face = faces[face_index]
        return np.asarray(face.embedding, dtype=np.float32), face, len(faces)

    def check_embedding(self, values) -> np.ndarray:
        return self.syn.check_embedding(values)

    # ---------------------------------------------------------------- synthesis
    def synthesize(self, embedding: np.ndarray, strategy: str, guidance: float | None, seed: int, samples: int,
                   steps: int | None, source: str) -> list:
        """``Synthesized`` results (LoRA + provenance + flat vector when the strategy yields one)."""
        from lorasynth.synthesis.synthesizer import SynthesisSettings

        if strategy not in self.strategies:
            raise LorasynthError(f"unknown or unavailable strategy {strategy!r}; choose one of {', '.join(self.strategies)}")
        settings = SynthesisSettings(strategy=strategy, guidance=guidance, steps=steps, seed=seed, samples=samples)
        return self.syn.synthesize(embedding, settings, source=source)

    def lora_file(self, lora, fmt: str, stem: str) -> tuple[bytes, str, str]:
        """``(bytes, filename, media type)`` of ``lora`` saved as ``fmt`` (a zip if the format is a folder)."""
        from lorasynth.formats import save_lora

        if fmt not in self.save_formats:
            raise LorasynthError(f"unknown format {fmt!r}; choose one of {', '.join(self.save_formats)}")
        with tempfile.TemporaryDirectory(prefix="lorasynth-serve-") as tmp:
            # peft is a folder (adapter_config.json + adapter_model.safetensors, what PeftModel loads): zipped
            target = Path(tmp) / (stem if fmt == "peft" else f"{stem}.safetensors")
            written = Path(save_lora(lora, target, fmt))
            if written.is_file():
                return written.read_bytes(), f"{stem}_{fmt}.safetensors", "application/octet-stream"
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(p for p in written.rglob("*") if p.is_file()):
                    z.write(p, p.relative_to(written).as_posix())
            return buf.getvalue(), f"{stem}_{fmt}.zip", "application/zip"

    def vector_of(self, lora, vector: np.ndarray | None = None) -> np.ndarray | None:
        """Flat canonical vector of a LoRA for the latent map (None if it does not fit the layout)."""
        if vector is not None:
            return np.asarray(vector, dtype=np.float32)
        try:
            return self.syn.layout.flatten(lora, canonical=True).numpy()
        except LorasynthError:
            return None

    # ---------------------------------------------------------------- blending
    def blend(self, loras: list, weights: list[float], rank: int | None):
        """``(LoRA, report dict)``: the exact weighted sum, or its best rank-r approximation."""
        from lorasynth.core.blending import blend

        lora, report = blend(loras, weights, rank=rank)
        return lora, {"rank": report.rank, "overall_relative_error": report.overall_error,
                      "max_module_relative_error": report.max_error}

    # ---------------------------------------------------------------- library
    def _need_library(self):
        if self.library is None:
            raise LibraryError("no library: start the server with --library LIB")
        return self.library

    def library_entries(self, query: str, limit: int, offset: int) -> tuple[int, list[dict]]:
        lib = self._need_library()
        q = query.strip().lower()
        with self._lib_lock:
            entries = lib.list()
        if q:
            entries = [e for e in entries if q in e.name.lower() or q in e.source.lower()
                       or q in str(e.attributes.get("trainer", "")).lower() or q == str(e.id)]
        rows = [{"id": e.id, "name": e.name, "source": e.source, "trainer": _trainer(e), "rank": e.rank,
                 "created": e.created} for e in entries[offset: offset + limit]]
        return len(entries), rows

    def library_lora(self, entry_id: int):
        lib = self._need_library()
        with self._lib_lock:
            entry, lora = lib.get(int(entry_id))
        return entry.name, lora

    def nearest(self, embedding: np.ndarray, k: int) -> list[dict]:
        """The library identities closest to a face (the library's own index, else the model's pack)."""
        if self.library is not None:
            with self._lib_lock:
                hits = self.library.nearest(embedding, self.info.embedder, k=k)
            return [{"id": h.id, "name": h.name, "cosine": round(h.score, 4)} for h in hits]
        rows, sims = self.syn.neighbours(self.check_embedding(embedding), k)
        return [{"id": self.syn.pack.ids[r], "name": self.syn.pack.ids[r], "cosine": round(float(s), 4)}
                for r, s in zip(rows[0], sims[0])]

    def latent_map(self) -> LatentMap:
        """2-D PCA of the model's library latents (training rows, at most ``cfg.map_points``), cached."""
        with self._map_lock:
            if self._map is None:
                self._map = library_map(self.syn, self.cfg.map_points)
            return self._map

    def project(self, vector: np.ndarray) -> list[float]:
        """A flat canonical LoRA vector's ``[x, y]`` on :meth:`latent_map`."""
        return [float(x) for x in project_vectors(self.syn, self.latent_map(), vector[None])[0]]

    # ---------------------------------------------------------------- generation
    def generation_settings(self, **fields):
        from lorasynth.runtime.pipeline import GenerationSettings

        s = GenerationSettings(**fields)
        s.validate()
        return s

    def generate_png(self, loras: list[tuple], settings, extra: dict[str, str], on_step: Callable[[int, int], None]) -> bytes:
        """Fuse ``[(LoRA, scale)]`` into the base pipeline, generate, return the PNG with its parameters."""
        from lorasynth.runtime.apply import fused
        from lorasynth.runtime.pipeline import generate, save_png

        if self.pipe is None:
            raise ModelError("no base model: start the server with --base BASE to generate previews")
        with fused(self.pipe, loras):
            image = generate(self.pipe, settings, progress=False, on_step=on_step)
        with tempfile.TemporaryDirectory(prefix="lorasynth-serve-") as tmp:
            return save_png(image, Path(tmp) / "preview.png", settings, extra).read_bytes()


def _trainer(entry) -> str:
    if entry.attributes.get("trainer"):
        return str(entry.attributes["trainer"])
    if entry.source.startswith("train:"):
        return "lorasynth library train"
    return ""
