"""The on-disk synthesis model: a folder tying a pack, a latent model and a hypernetwork.

    MODEL/
      lorasynth_model.json   layout, embedder, pack path, held-out split, which parts exist
      latent/                vae.safetensors + vae.json   (or pca.safetensors + pca.json)
      hypernet/              hypernet.safetensors + hypernet.json
      train/<part>/          Lightning checkpoints (last.ckpt), CSV logs, loss_curve.png

Everything a synthesis needs loads from safetensors + JSON: nothing is unpickled. The
Lightning checkpoints under ``train/`` are only for resuming training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelError
from .formats.safe_io import write_text
from .layout import Layout

MODEL_FILE = "lorasynth_model.json"
FORMAT_VERSION = 1


@dataclass
class ModelInfo:
    """Contents of ``lorasynth_model.json``."""

    layout: dict
    layout_signature: str
    embedder: str
    embed_dim: int
    pack: str  # absolute path of the training pack (nearest/blend strategies read it)
    train_ids: list[int] = field(default_factory=list)  # pack rows used for training
    heldout_ids: list[int] = field(default_factory=list)  # pack rows kept out for evaluation (test)
    val_ids: list[int] = field(default_factory=list)  # pack rows of validation people (tuning only)
    latent_kind: str | None = None  # "vae" | "pca" once trained
    has_hypernet: bool = False
    version: int = FORMAT_VERSION


class SynthesisModel:
    """A model folder (see module docstring)."""

    def __init__(self, path: str | Path, info: ModelInfo):
        self.path = Path(path)
        self.info = info
        self.layout = Layout.from_dict(info.layout)

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, pack, heldout_frac: float = 0.0, seed: int = 0,
               val_frac: float = 0.1) -> "SynthesisModel":
        """A new model folder for ``pack``, its people split into train / validation / test.

        ``heldout_frac`` of the *people* are kept out for ``lorasynth eval`` (test), ``val_frac``
        for choosing settings (mean kernel, sampler, early stopping); a person's LoRAs all land
        on one side (:func:`lorasynth.splits.split_by_person`).
        """
        from .splits import split_by_person

        path = Path(path)
        if (path / MODEL_FILE).exists():
            raise ModelError(f"{path} already holds a lorasynth model; use a new folder or --resume")
        train, val, test = split_by_person(pack.ids, val_frac, heldout_frac, seed)
        info = ModelInfo(
            layout=pack.layout.to_dict(), layout_signature=pack.layout.signature, embedder=pack.embedder,
            embed_dim=pack.embed_dim, pack=str(Path(pack.path).resolve()),
            train_ids=[int(i) for i in train], heldout_ids=[int(i) for i in test], val_ids=[int(i) for i in val],
        )
        model = cls(path, info)
        model.save()
        return model

    @classmethod
    def open(cls, path: str | Path) -> "SynthesisModel":
        path = Path(path)
        f = path / MODEL_FILE
        if not f.is_file():
            raise ModelError(f"{path} is not a lorasynth model folder (no {MODEL_FILE}); train one with `lorasynth train vae`")
        try:
            raw = json.loads(f.read_text())
            info = ModelInfo(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise ModelError(f"{f} is corrupt: {e}") from None
        if info.version != FORMAT_VERSION:
            raise ModelError(f"{f}: model format version {info.version}, this lorasynth reads {FORMAT_VERSION}")
        return cls(path, info)

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / MODEL_FILE, json.dumps(asdict(self.info), indent=1))

    # ---------------------------------------------------------------- parts
    @property
    def latent_dir(self) -> Path:
        return self.path / "latent"

    @property
    def hypernet_dir(self) -> Path:
        return self.path / "hypernet"

    def train_dir(self, part: str) -> Path:
        return self.path / "train" / part

    def open_pack(self, override: str | Path | None = None):
        from .pack import open_pack

        pack = open_pack(override or self.info.pack)
        if pack.layout.signature != self.info.layout_signature:
            raise ModelError(f"pack {pack.path} has layout {pack.layout.signature}, the model {self.info.layout_signature}")
        return pack

    def load_latent(self):
        from .latent import load_latent

        if not self.info.latent_kind:
            raise ModelError(f"model {self.path} has no latent model yet; run `lorasynth train vae`")
        model = load_latent(self.latent_dir)
        if model.layout_signature and model.layout_signature != self.info.layout_signature:
            raise ModelError("latent model was trained on another layout than this model folder")
        return model

    def load_hypernet(self):
        """The exported hypernetwork (plain torch: no Lightning, no diffusers)."""
        from .hypernet.model import Hypernet

        if not self.info.has_hypernet:
            raise ModelError(f"model {self.path} has no hypernetwork yet; run `lorasynth train hypernet`")
        return Hypernet.load(self.hypernet_dir).eval()

    def model_hash(self) -> str:
        """Short sha256 over the exported weight files: provenance for synthesized LoRAs."""
        h = hashlib.sha256()
        for f in sorted(list(self.latent_dir.glob("*.safetensors")) + list(self.hypernet_dir.glob("*.safetensors"))):
            h.update(f.read_bytes())
        return h.hexdigest()[:16]
