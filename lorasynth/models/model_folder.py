"""The on-disk synthesis model: a folder tying a pack, a latent model and a hypernetwork.

    MODEL/
      lorasynth_model.json   layout, embedder, pack path, held-out split, which parts exist
      latent/                vae.safetensors + vae.json   (or pca.safetensors + pca.json)
      hypernet/              hypernet.safetensors + hypernet.json
      train/<part>/          Lightning checkpoints (last.ckpt), CSV logs, loss_curve.png

Everything a synthesis needs loads from safetensors + JSON: nothing is unpickled. The
Lightning checkpoints under ``train/`` are only for resuming training.

``lorasynth_model.json`` records the SHA-256 of every file under ``latent/`` and ``hypernet/``
when the model is saved (after each export); loading a part verifies them, so a damaged or
altered weight file is refused with one line instead of being run.

:meth:`SynthesisModel.save_pretrained` writes the shareable subset (weights, config, a model
card ``README.md``) as a Hugging Face hub repository; :meth:`SynthesisModel.from_pretrained`
opens a local folder or a hub id (through ``huggingface_hub.snapshot_download``, which honours
``HF_HUB_OFFLINE`` and the local cache).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

import numpy as np

from lorasynth.errors import LorasynthError, ModelError
from lorasynth.core.safe_io import parse_json, read_json, write_text
from lorasynth.core.layout import Layout

MODEL_FILE = "lorasynth_model.json"
FORMAT_VERSION = 1
PARTS = ("latent", "hypernet")  # sub-folders holding exported weights + their JSON configs
_HASHED_SUFFIXES = (".safetensors", ".json")
_MAX_MODEL_JSON = 64 * 2**20  # train/held-out ids of a 65k-identity pack take ~1 MB


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
    files: dict[str, str] = field(default_factory=dict)  # "latent/vae.safetensors" -> SHA-256 at save

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> "ModelInfo":
        """Parse and type-check ``lorasynth_model.json``; any defect is one ModelError line."""
        def bad(why: str) -> ModelError:
            return ModelError(f"{where} is corrupt: {why}")

        raw = parse_json(data, f"{where} is corrupt", error=ModelError)  # UTF-8, depth, duplicate keys, an object
        known = {f.name for f in fields(cls)}
        missing = {"layout", "layout_signature", "embedder", "embed_dim", "pack"} - set(raw)
        if missing:
            raise bad(f"missing {', '.join(sorted(missing))}")
        raw = {k: v for k, v in raw.items() if k in known}  # newer writers may add fields
        checks = {
            "layout": lambda v: isinstance(v, dict),
            "layout_signature": lambda v: isinstance(v, str),
            "embedder": lambda v: isinstance(v, str),
            "embed_dim": lambda v: type(v) is int and 0 < v <= 65536,
            "pack": lambda v: isinstance(v, str),
            "train_ids": _int_list,
            "heldout_ids": _int_list,
            "val_ids": _int_list,
            "latent_kind": lambda v: v is None or v in ("vae", "pca"),
            "has_hypernet": lambda v: isinstance(v, bool),
            "version": lambda v: type(v) is int,
            "files": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, str) for k, h in v.items()),
        }
        for key, ok in checks.items():
            if key in raw and not ok(raw[key]):
                raise bad(f"field {key!r} has an invalid value ({_short(raw[key])})")
        for rel in raw.get("files", {}):
            if not _plain_relative(rel):
                raise bad(f"recorded file {rel!r} is not a plain path inside the model folder")
        return cls(**raw)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and "\\" not in rel and all(part not in ("", ".", "..") for part in p.parts)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _verified_part(part: str):
    """Decorator of ``load_<part>``: verify the part's recorded hashes first; loader failures
    (a missing file, a config that does not fit its weights...) become one ModelError line."""
    def wrap(load):
        @functools.wraps(load)
        def checked(self):
            self.verify(part)
            try:
                return load(self)
            except LorasynthError as e:
                if "\n" not in str(e):
                    raise
                raise type(e)(_one_line(str(e))) from None  # e.g. a torch size-mismatch dump inside the message
            except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"the {part} model in {self.path / part} does not load "
                                 f"({type(e).__name__}: {_one_line(str(e))})") from None
        return checked
    return wrap


class SynthesisModel:
    """A model folder (see module docstring)."""

    def __init__(self, path: str | Path, info: ModelInfo):
        self.path = Path(path)
        self.info = info
        self._hashing: threading.Thread | None = None
        self._digests: dict[str, str | OSError] = {}
        try:
            self.layout = Layout.from_dict(info.layout)
        except (LorasynthError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ModelError(f"{self.path / MODEL_FILE} is corrupt: its layout is invalid ({e})") from None
        if self.layout.signature != info.layout_signature:
            raise ModelError(f"{self.path / MODEL_FILE} is corrupt: layout signature {info.layout_signature} does not "
                             f"match its layout ({self.layout.signature})")

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | Path, pack, heldout_frac: float = 0.0, seed: int = 0,
               val_frac: float = 0.1, save: bool = True) -> "SynthesisModel":
        """A new model folder for ``pack``, its people split into train / validation / test.

        ``heldout_frac`` of the *people* are kept out for ``lorasynth eval`` (test), ``val_frac``
        for choosing settings (mean kernel, sampler, early stopping); a person's LoRAs all land
        on one side (:func:`lorasynth.library.splits.split_by_person`).

        ``save=False`` only plans it in memory (the split is a function of the pack's ids,
        the fractions and ``seed``): what the non-zero ranks of a DDP run do while rank 0
        writes the folder.
        """
        from lorasynth.library.splits import split_by_person

        path = Path(path)
        if save and (path / MODEL_FILE).exists():
            raise ModelError(f"{path} already holds a lorasynth model; use a new folder or --resume")
        train, val, test = split_by_person(pack.ids, val_frac, heldout_frac, seed)
        info = ModelInfo(
            layout=pack.layout.to_dict(), layout_signature=pack.layout.signature, embedder=pack.embedder,
            embed_dim=pack.embed_dim, pack=str(Path(pack.path).resolve()),
            train_ids=[int(i) for i in train], heldout_ids=[int(i) for i in test], val_ids=[int(i) for i in val],
        )
        model = cls(path, info)
        if save:
            model.save()
        return model

    @classmethod
    def open(cls, path: str | Path) -> "SynthesisModel":
        path = Path(path)
        f = path / MODEL_FILE
        if not f.is_file():
            raise ModelError(f"{path} is not a lorasynth model folder (no {MODEL_FILE}); train one with `lorasynth train latent`")
        try:
            if f.stat().st_size > _MAX_MODEL_JSON:
                raise ModelError(f"{f} is corrupt: larger than {_MAX_MODEL_JSON >> 20} MB")
            data = f.read_bytes()
        except OSError as e:
            raise ModelError(f"cannot read {f}: {e.strerror or e}") from None
        info = ModelInfo.from_json_bytes(data, str(f))
        if info.version != FORMAT_VERSION:
            raise ModelError(f"{f}: model format version {info.version}, this lorasynth reads {FORMAT_VERSION}")
        return cls(path, info)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None) -> "SynthesisModel":
        """Open a local model folder, or a Hugging Face hub repository ``"org/name"``.

        Hub repositories come through ``huggingface_hub.snapshot_download`` (its cache, its
        ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` / ``HF_TOKEN`` settings); nothing is downloaded
        when the snapshot is already cached.

        >>> model = SynthesisModel.from_pretrained("my-model")        # doctest: +SKIP
        >>> model = SynthesisModel.from_pretrained("org/w2w-dlib")    # doctest: +SKIP
        """
        return cls.open(resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir))

    def save(self) -> None:
        """Write ``lorasynth_model.json``, recording the SHA-256 of every exported file."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.info.files = {rel: sha256_file(self.path / rel) for rel in self._part_files()}
        write_text(self.path / MODEL_FILE, json.dumps(asdict(self.info), indent=1))

    def _part_files(self) -> list[str]:
        """Relative paths of the exported files under ``latent/`` and ``hypernet/``."""
        out = []
        for part in PARTS:
            d = self.path / part
            if d.is_dir():
                out += [f"{part}/{f.name}" for f in sorted(d.iterdir()) if f.is_file() and f.suffix in _HASHED_SUFFIXES]
        return out

    def verify(self, part: str | None = None) -> None:
        """Check the recorded SHA-256 of every file of ``part`` (or of all parts): ModelError on a mismatch.

        Folders saved before hashes were recorded have nothing to check.
        """
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None
        for rel, digest in sorted(self.info.files.items()):
            if part is not None and not rel.startswith(part + "/"):
                continue
            f = self.path / rel
            if not f.is_file():
                raise ModelError(f"model folder {self.path} is missing {rel} (recorded at export); "
                                 "copy or download the whole folder again")
            actual = self._digests.pop(rel, None)
            try:
                if isinstance(actual, OSError):
                    raise actual
                actual = actual or sha256_file(f)
            except OSError as e:
                raise ModelError(f"cannot read {f}: {e.strerror or e}") from None
            if actual != digest:
                raise ModelError(f"{f} does not match the SHA-256 recorded at export: the file is damaged or was "
                                 "altered; copy or download the model again")

    def start_verify(self) -> None:
        """Hash the recorded files in a background thread (hashlib releases the GIL), so that a
        later :meth:`verify` (loading a part) only waits for what is left: a synthesis process
        hashes the weights while it embeds the face photo."""
        if self._hashing is not None or not self.info.files:
            return

        def work() -> None:
            for rel in self.info.files:
                try:
                    self._digests[rel] = sha256_file(self.path / rel)
                except OSError as e:
                    self._digests[rel] = e

        self._hashing = threading.Thread(target=work, name="lorasynth-verify", daemon=True)
        self._hashing.start()

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
        from lorasynth.library.pack import open_pack

        if not override and not self.info.pack:
            raise ModelError(f"model {self.path} ships no pack: the nearest and blend strategies need the training "
                             "pack (pass pack=... / --pack), the diffusion strategy does not")
        where = Path(override or self.info.pack)
        pack = open_pack(where if override or where.is_absolute() else self.path / where)
        if pack.layout.signature != self.info.layout_signature:
            raise ModelError(f"pack {pack.path} has layout {pack.layout.signature}, the model {self.info.layout_signature}")
        return pack

    @_verified_part("latent")
    def load_latent(self):
        from lorasynth.models.latent import load_latent

        if not self.info.latent_kind:
            raise ModelError(f"model {self.path} has no latent model yet; run `lorasynth train latent`")
        model = load_latent(self.latent_dir)
        if model.layout_signature and model.layout_signature != self.info.layout_signature:
            raise ModelError("latent model was trained on another layout than this model folder")
        return model

    @_verified_part("hypernet")
    def load_hypernet(self):
        """The exported hypernetwork (plain torch: no Lightning, no diffusers)."""
        from lorasynth.models.hypernet.model import Hypernet

        if not self.info.has_hypernet:
            raise ModelError(f"model {self.path} has no hypernetwork yet; run `lorasynth train hypernet`")
        return Hypernet.load(self.hypernet_dir).eval()

    def model_hash(self) -> str:
        """Short sha256 over the exported weight files: provenance for synthesized LoRAs.

        From the recorded per-file digests when the folder has them (no file is read again).
        """
        h = hashlib.sha256()
        weights = sorted(rel for rel in self.info.files if rel.endswith(".safetensors"))
        if weights:
            for rel in weights:
                h.update(f"{rel}:{self.info.files[rel]}\n".encode())
            return h.hexdigest()[:16]
        for f in sorted(list(self.latent_dir.glob("*.safetensors")) + list(self.hypernet_dir.glob("*.safetensors"))):
            h.update(f.read_bytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- sharing (hub repositories)
    def save_pretrained(self, out_dir: str | os.PathLike, *, include_pack: bool = False, base_model: str | None = None,
                        license: str = "other", eval_results: dict | None = None) -> Path:
        """Write a shareable copy of this model: weights, config and a model card, hub-style.

        ``out_dir`` gets ``lorasynth_model.json`` (with the SHA-256 of every file), ``latent/``,
        ``hypernet/`` and ``README.md`` (a model card: YAML header with ``library_name:
        lorasynth``, ``base_model``, ``license``, ``tags``, ``embedder``, ``layout_signature``;
        the ``lorasynth eval`` table when ``MODEL/eval/eval.json`` exists or ``eval_results`` is
        given; intended use and the face-data caveat). Training checkpoints stay behind. The
        training pack (needed by the nearest/blend strategies; large) is copied only with
        ``include_pack=True``; otherwise no local path of this machine is recorded.

        >>> SynthesisModel.open("runs/model").save_pretrained("share/w2w-dlib")  # doctest: +SKIP
        """
        from lorasynth.models.model_card import render_model_card

        out = Path(out_dir)
        if out.resolve() == self.path.resolve():
            raise ModelError("save_pretrained needs a new folder, not the model folder itself")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ModelError(f"{out} already exists and is not an empty folder")
        if not self.info.latent_kind:
            raise ModelError(f"model {self.path} has no latent model yet; nothing to share")
        self.verify()
        try:
            out.mkdir(parents=True, exist_ok=True)
            for rel in self._part_files():
                (out / rel).parent.mkdir(exist_ok=True)
                shutil.copyfile(self.path / rel, out / rel)
            info = ModelInfo(**{**asdict(self.info), "pack": ""})
            if include_pack:
                shutil.copytree(self.open_pack().path, out / "pack")
                info.pack = "pack"
        except OSError as e:
            raise ModelError(f"cannot write {out}: {e.strerror or e}") from None
        shared = SynthesisModel(out, info)
        shared.save()
        if eval_results is None and (self.path / "eval" / "eval.json").is_file():
            try:
                eval_results = read_json(self.path / "eval" / "eval.json", error=ModelError)
            except ModelError:
                eval_results = None
        write_text(out / "README.md", render_model_card(shared, base_model=base_model, license=license,
                                                         eval_results=eval_results))
        return out


def _looks_local(name: str) -> bool:
    """A path the user meant as a folder: anything that cannot be a hub id ``org/name``."""
    return (name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") != 1
            or (os.altsep is not None and os.altsep in name.replace("/", "")) or ":" in name)


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """A local model folder for ``name_or_path``: the folder itself, or a hub snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or not isinstance(name_or_path, str) or _looks_local(name_or_path):
        if not path.is_dir():
            raise ModelError(f"model folder {path} does not exist")
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        raise ModelError(f"{name_or_path} is not a folder, and huggingface_hub is not installed to fetch it") from None
    try:
        return Path(snapshot_download(repo_id=name_or_path, revision=revision, cache_dir=cache_dir))
    except HFValidationError:
        raise ModelError(f"{name_or_path} is neither a model folder nor a valid hub id (org/name)") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{name_or_path} is not a local folder and not in the Hugging Face cache "
                         "(offline: HF_HUB_OFFLINE is set or the hub is unreachable)") from None
    except Exception as e:  # huggingface_hub's HTTP errors (not found, gated, network)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"cannot fetch model {name_or_path} from the Hugging Face hub: {first}") from None
