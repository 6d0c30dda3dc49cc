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

        # "average": diffusion's expected delta W for the face (one LoRA, fidelity); "sample": a new identity
        names = [s for s in STRATEGIES if s not in ("diffusion", "sample")]
        return (["diffusion", "average"] + names + ["sample"]) if self.info.has_hypernet else names

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

    def embedding_from_json(self, text: str) -> np.ndarray:
        """A JSON array of numbers -> a checked embedding, or one :class:`InputError` line.

        Nesting is refused before parsing (no recursion on ``[[[[...``), booleans and strings are
        not numbers, and every value must be a finite float (a 401-digit integer is not).
        """
        from lorasynth.core.numbers import parse_float
        from lorasynth.core.safe_io import parse_json
        from lorasynth.errors import InputError

        values = parse_json(text, "embedding", expect=list, max_depth=1, error=InputError,
                            invalid="not a JSON array of numbers", unique_keys=False)
        for i, x in enumerate(values):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise InputError(f"embedding[{i}] must be a number, got {type(x).__name__} {str(x)[:20]!r}")
            values[i] = parse_float(x, f"embedding[{i}]")
        return self.check_embedding(np.asarray(values, dtype=np.float64))

    # ---------------------------------------------------------------- synthesis
    def synthesize(self, embedding: np.ndarray, strategy: str, guidance: float | None, seed: int, samples: int,
                   steps: int | None, source: str) -> list:
        """``Synthesized`` results (LoRA + provenance + flat vector when the strategy yields one)."""
        from lorasynth.synthesis.synthesizer import SynthesisSettings

        if strategy not in self.strategies:
            raise LorasynthError(f"unknown or unavailable strategy {strategy!r}; choose one of {', '.join(self.strategies)}")
        settings = SynthesisSettings(strategy="diffusion" if strategy == "average" else strategy, guidance=guidance,
                                     steps=steps, seed=seed, samples=samples, average=strategy == "average")
        settings.validate()  # the CLI's rules (guidance, steps, seed, samples), before any work
        return self.syn.synthesize(embedding, settings, source=source)

    def lora_file(self, lora, fmt: str, stem: str) -> tuple[bytes, str, str]:
        """``(bytes, filename, media type)`` of ``lora`` saved as ``fmt`` (a zip if the format is a folder)."""
        from lorasynth.formats import save_lora

        if fmt not in self.save_formats:
            raise LorasynthError(f"unknown format {fmt!r}; choose one of {', '.join(self.save_formats)}")
        with tempfile.TemporaryDirectory(prefix="lorasynth-serve-") as tmp:
            if fmt != "peft":
                written = Path(save_lora(lora, Path(tmp) / f"{stem}.safetensors", fmt))
                return written.read_bytes(), f"{stem}_{fmt}.safetensors", "application/octet-stream"
            # peft is a folder (adapter_config.json + adapter_model.safetensors, what PeftModel loads), written
            # as the CLI writes it, zipped: its config carries each module's lora_alpha (without it, alpha = rank)
            folder = Path(tmp) / stem
            save_lora(lora, folder, fmt)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(p for p in folder.iterdir() if p.is_file()):
                    z.write(p, p.name)
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
        """``(LoRA, report dict)``: the exact weighted sum, or its best rank-r approximation.

        An exact sum whose concatenated rank exceeds a module's full rank ``min(out, in)`` is
        re-factored there by SVD: the same update (to rounding), never more factors than the
        matrix itself would hold (``report["compressed_modules"]`` counts them).
        """
        from lorasynth.core.blending import blend
        from lorasynth.core.lora import LoRA, canonicalize_module

        lora, report = blend(loras, weights, rank=rank)
        compressed = 0
        if rank is None:
            modules = dict(lora.modules)
            for name, m in modules.items():
                full = min(m.out_features, m.in_features)
                if m.rank > full:
                    modules[name] = canonicalize_module(m, rank=full)
                    compressed += 1
            if compressed:
                lora = LoRA(modules, lora.metadata)
        return lora, {"rank": report.rank, "overall_relative_error": report.overall_error,
                      "max_module_relative_error": report.max_error, "compressed_modules": compressed}

    @staticmethod
    def blend_nbytes(loras: list, rank: int | None) -> int:
        """Tensor bytes of :meth:`blend`'s result, known before computing it (float32 factors)."""
        shapes: dict[str, tuple[int, int, int]] = {}
        for lora in loras:
            for name, m in lora.modules.items():
                _, _, r = shapes.get(name, (m.out_features, m.in_features, 0))
                shapes[name] = (m.out_features, m.in_features, r + m.rank)
        size = max((t.element_size() for lora in loras for m in lora.modules.values() for t in (m.down,)), default=4)
        if rank is None:
            return sum((o + i) * min(r, o, i) for o, i, r in shapes.values()) * max(4, size)
        cap = min(rank, max((min(r, o, i) for o, i, r in shapes.values()), default=0))  # blend's own cap (zero-padded)
        return sum((o + i) * cap for o, i, _ in shapes.values()) * max(4, size)

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
            entry, lora = lib.get(entry_id)
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

    def generate_png(self, loras: list[tuple], settings, extra: dict[str, str], on_step: Callable[[int, int], None],
                     tags: list[tuple[str, float]] | None = None) -> bytes:
        """Fuse ``[(LoRA, scale)]`` into the base pipeline, generate, return the PNG with its parameters
        (``tags``: ``[(name, scale)]`` written as A1111's ``<lora:name:scale>`` in the infotext's prompt)."""
        from lorasynth.runtime.apply import fused
        from lorasynth.runtime.pipeline import generate, save_png

        if self.pipe is None:
            raise ModelError("no base model: start the server with --base BASE to generate previews")
        with fused(self.pipe, loras):
            image = generate(self.pipe, settings, progress=False, on_step=on_step)
        with tempfile.TemporaryDirectory(prefix="lorasynth-serve-") as tmp:
            return save_png(image, Path(tmp) / "preview.png", settings, extra, tags).read_bytes()

    def infotext_fields(self, named: list[tuple[str, object]]) -> dict[str, str]:
        """A1111's infotext fields for the base and ``[(name, LoRA)]``: ``Model`` (+ ``Model hash``, the
        10-digit sha256 of a single-file checkpoint, cached), ``Lora hashes`` (``name: hash`` with each LoRA's
        A1111 hash: sha256 of its kohya file's data section, the 12 digits A1111 computes for the download)."""
        import hashlib
        import struct

        from lorasynth.formats.metadata import model_file_hash

        base = Path(str(self.cfg.base))
        fields = {"Model": base.stem if base.is_file() else base.name}
        if base.is_file():
            if getattr(self, "_base_hash", None) is None:
                self._base_hash = model_file_hash(base)[:10]
            fields["Model hash"] = self._base_hash
        hashes = []
        for name, lora in named:
            data = self.lora_file(lora, "kohya", name)[0]
            (n,) = struct.unpack("<Q", data[:8])
            hashes.append(f"{name}: {hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()[:12]}")
        if hashes:
            fields["Lora hashes"] = ", ".join(hashes)
        return fields

    # ---------------------------------------------------------------- editing (attribute directions)
    def attribute_directions(self) -> dict[str, tuple[np.ndarray, float]]:
        """``{attribute: (unit latent direction, std of the latents along it)}`` for every numeric or
        yes/no attribute of the library's entries that the model's training rows can fit (cached)."""
        from lorasynth.synthesis.editing import attribute_direction

        if self.library is None:
            return {}
        with self._lib_lock:
            if getattr(self, "_directions", None) is None:
                names = sorted({k for e in self.library.list() for k, v in (e.attributes or {}).items()
                                if isinstance(v, (int, float, bool))})
                found = {}
                for name in names[:32]:
                    try:
                        found[name] = attribute_direction(self.syn, self.library, name)
                    except LibraryError:
                        continue
                self._directions = found
            return self._directions

    def edit(self, vector: np.ndarray, attribute: str, strength: float):
        """``(LoRA, flat vector)``: ``vector`` encoded, moved ``strength`` standard deviations along the
        attribute's direction (w2w-style least squares), decoded."""
        import torch

        directions = self.attribute_directions()
        if attribute not in directions:
            raise LorasynthError(f"no attribute {attribute!r} to edit along; this server has "
                                 f"{', '.join(directions) or 'none (the library entries carry no numeric attributes)'}")
        d, std = directions[attribute]
        with torch.no_grad():
            z = self.syn.latent.encode(self.syn.latent.standardize(np.asarray(vector, dtype=np.float32)[None]))
            vec = self.syn.decode(z.float() + strength * std * torch.from_numpy(d).float()[None])[0]
        return self.syn.layout.unflatten(torch.from_numpy(vec)), vec


def _trainer(entry) -> str:
    if entry.attributes.get("trainer"):
        return str(entry.attributes["trainer"])
    if entry.source.startswith("train:"):
        return "lorasynth library train"
    return ""
