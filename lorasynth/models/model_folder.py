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
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

import numpy as np

from lorasynth.errors import LorasynthError, ModelError
from lorasynth.core.safe_io import (copy_input, ensure_folder, input_sha256, kind_problem, parse_json, read_input_bytes,
                                    read_json, write_text)
from lorasynth.core.layout import Layout
from lorasynth.models.latent.export import MAX_PART_BYTES

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
    """SHA-256 of a model file: a regular file (a link is followed to one), else one ModelError line."""
    return input_sha256(path, "model file", ModelError)


def _part_limit(rel: str) -> int:
    return _MAX_MODEL_JSON if rel.endswith(".json") else MAX_PART_BYTES


def _verified_part(part: str):
    """Decorator of ``load_<part>(self, read)``: the loader reads its files through ``read``, which
    returns bytes checked against the recorded hashes (:meth:`SynthesisModel.read_part`); recorded
    files of the part it did not read are then verified too. Loader failures (a missing file, a
    config that does not fit its weights...) become one ModelError line."""
    def wrap(load):
        @functools.wraps(load)
        def checked(self):
            read_ok: set[str] = set()
            try:
                model = load(self, self.part_reader(part, read_ok))
                self.verify(part, skip=read_ok)
                return model
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
        self._digests: dict[str, tuple[bytes | bytearray, str] | LorasynthError] = {}
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
        if not os.path.lexists(f):
            raise ModelError(f"{path} is not a lorasynth model folder (no {MODEL_FILE}); train one with `lorasynth train latent`")
        data = read_input_bytes(f, MODEL_FILE, _MAX_MODEL_JSON, ModelError)
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
            if d.is_dir() and not d.is_symlink():  # links are never recorded (nor copied by save_pretrained)
                out += [f"{part}/{f.name}" for f in sorted(d.iterdir())
                        if f.suffix in _HASHED_SUFFIXES and kind_problem(f.lstat().st_mode, "file") is None]
        return out

    def verify(self, part: str | None = None, skip: set[str] | frozenset = frozenset()) -> None:
        """Check the recorded SHA-256 of every file of ``part`` (or of all parts): ModelError on a mismatch.

        Folders saved before hashes were recorded have nothing to check. ``skip``: files already
        checked (by :meth:`read_part`).
        """
        for rel in sorted(self.info.files):
            if (part is None or rel.startswith(part + "/")) and rel not in skip:
                self._check_digest(rel, self._prefetched(rel)[1])

    def _prefetched(self, rel: str) -> tuple[bytes | bytearray | None, str]:
        """``(bytes or None, SHA-256)`` of a recorded file: from the background read, else hashed now."""
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None
        got = self._digests.pop(rel, None)
        if isinstance(got, LorasynthError):
            raise got
        if got is not None:
            return got
        self._missing(rel)
        return None, sha256_file(self.path / rel)

    def _missing(self, rel: str) -> None:
        if rel in self.info.files and not os.path.lexists(self.path / rel):
            raise ModelError(f"model folder {self.path} is missing {rel} (recorded at export); "
                             "copy or download the whole folder again")

    def _check_digest(self, rel: str, actual: str) -> None:
        if rel in self.info.files and actual != self.info.files[rel]:
            raise ModelError(f"{self.path / rel} does not match the SHA-256 recorded at export: the file is damaged or "
                             "was altered; copy or download the model again")

    def read_part(self, rel: str) -> bytes | bytearray:
        """The bytes of model file ``rel`` (e.g. ``"latent/vae.json"``), checked against the SHA-256
        recorded in ``lorasynth_model.json`` on these same bytes: what a loader parses is what was
        checked (no check-then-reopen). Regular files only, bounded; one ModelError line otherwise."""
        data, digest = self._prefetched(rel) if rel in self.info.files else (None, None)
        if data is None:
            self._missing(rel)
            data = read_input_bytes(self.path / rel, rel, _part_limit(rel), ModelError, mutable=True)
            digest = hashlib.sha256(data).hexdigest()
        self._check_digest(rel, digest)
        return data

    def part_reader(self, part: str, checked: set[str]):
        """A reader (``read(name) -> bytes``) of ``part``'s files through :meth:`read_part`; adds each to ``checked``."""
        def read(name: str) -> bytes | bytearray:
            rel = f"{part}/{name}"
            checked.add(rel)
            return self.read_part(rel)
        return read

    def start_verify(self) -> None:
        """Read and hash the recorded files in a background thread (hashlib releases the GIL), so that a
        later load only waits for what is left: a synthesis process reads the weights while it embeds
        the face photo. The loaders parse exactly the bytes that were hashed (:meth:`read_part`)."""
        if self._hashing is not None or not self.info.files:
            return

        def work() -> None:
            for rel in self.info.files:
                try:
                    self._missing(rel)
                    data = read_input_bytes(self.path / rel, rel, _part_limit(rel), ModelError, mutable=True)
                    self._digests[rel] = (data, hashlib.sha256(data).hexdigest())
                except LorasynthError as e:
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
    def load_latent(self, read=None):
        from lorasynth.models.latent import load_latent

        if not self.info.latent_kind:
            raise ModelError(f"model {self.path} has no latent model yet; run `lorasynth train latent`")
        model = load_latent(self.latent_dir, read=read, kind=self.info.latent_kind)
        if model.layout_signature and model.layout_signature != self.info.layout_signature:
            raise ModelError("latent model was trained on another layout than this model folder")
        return model

    @_verified_part("hypernet")
    def load_hypernet(self, read=None):
        """The exported hypernetwork (plain torch: no Lightning, no diffusers)."""
        from lorasynth.models.hypernet.model import Hypernet

        if not self.info.has_hypernet:
            raise ModelError(f"model {self.path} has no hypernetwork yet; run `lorasynth train hypernet`")
        return Hypernet.load(self.hypernet_dir, read=read).eval()

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
            h.update(read_input_bytes(f, "model file", MAX_PART_BYTES, ModelError))
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
        if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
            raise ModelError(f"{out} already exists and is not an empty folder")
        if not self.info.latent_kind:
            raise ModelError(f"model {self.path} has no latent model yet; nothing to share")
        files = self.listed_files()
        pack_dir = self.open_pack().path if include_pack else None
        ensure_folder(out.parent)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            digests = {rel: self._copy_listed(self.path / rel, stage / rel, self.info.files.get(rel)) for rel in files}
            info = ModelInfo(**{**asdict(self.info), "pack": "", "files": digests})
            if pack_dir is not None:
                from lorasynth.library.pack import PACK_FILES

                for name in PACK_FILES:
                    if os.path.lexists(Path(pack_dir) / name):
                        self._copy_listed(Path(pack_dir) / name, stage / "pack" / name, None)
                info.pack = "pack"
            shared = SynthesisModel(stage, info)
            write_text(stage / MODEL_FILE, json.dumps(asdict(info), indent=1))
            if eval_results is None and (self.path / "eval" / "eval.json").is_file():
                try:
                    eval_results = read_json(self.path / "eval" / "eval.json", error=ModelError)
                except ModelError:
                    eval_results = None
            write_text(stage / "README.md", render_model_card(shared, base_model=base_model, license=license,
                                                               eval_results=eval_results))
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            os.replace(stage, out)
        except OSError as e:
            raise ModelError(f"cannot write {out}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out

    def listed_files(self) -> list[str]:
        """The files ``lorasynth_model.json`` lists (its recorded hashes), or for folders saved before
        hashes were recorded, the part files its ``latent_kind`` / ``has_hypernet`` name."""
        if self.info.files:
            outside = [rel for rel in self.info.files if rel.split("/")[0] not in PARTS]
            if outside:
                raise ModelError(f"{self.path / MODEL_FILE} lists {outside[0]!r}, outside {' and '.join(PARTS)}/; "
                                 "refusing to copy it")
            return sorted(self.info.files)
        out = [f"latent/{self.info.latent_kind}.safetensors", f"latent/{self.info.latent_kind}.json"]
        if self.info.has_hypernet:
            out += ["hypernet/hypernet.safetensors", "hypernet/hypernet.json"]
        return out

    def _copy_listed(self, src: Path, dst: Path, recorded: str | None) -> str:
        """Copy one listed file as a regular file (a link is refused, never followed); its SHA-256,
        computed on the bytes copied and checked against ``recorded``."""
        for folder in [p for p in src.relative_to(self.path).parents][:-1] if src.is_relative_to(self.path) else []:
            if (self.path / folder).is_symlink():
                raise ModelError(f"{self.path / folder}: is a symbolic link; export-model copies regular files "
                                 "inside the model folder only")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "xb") as f:
            digest = copy_input(src, f, "model file", ModelError, follow_links=False)
        if recorded is not None and digest != recorded:
            raise ModelError(f"{src} does not match the SHA-256 recorded at export: the file is damaged or was "
                             "altered; copy or download the model again")
        return digest


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
    if revision is not None and not _safe_revision(revision):
        raise ModelError(f"revision {revision!r} is not a branch, tag or commit name (no '..', no absolute path)"[:300])
    try:
        snapshot = Path(snapshot_download(repo_id=name_or_path, revision=revision, cache_dir=cache_dir))
    except HFValidationError:
        raise ModelError(f"{name_or_path} is neither a model folder nor a valid hub id (org/name)") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{name_or_path} is not a local folder and not in the Hugging Face cache "
                         "(offline: HF_HUB_OFFLINE is set or the hub is unreachable)") from None
    except Exception as e:  # huggingface_hub's HTTP errors (not found, gated, network)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"cannot fetch model {name_or_path} from the Hugging Face hub: {first}") from None
    return check_snapshot(snapshot, name_or_path, cache_dir)


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _safe_revision(revision: str) -> bool:
    return (isinstance(revision, str) and 0 < len(revision) <= 256 and not revision.startswith(("/", "\\"))
            and "\\" not in revision and all(part not in ("", ".", "..") for part in revision.split("/"))
            and revision.isprintable())


def check_snapshot(snapshot: Path, repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Refuse a hub snapshot outside its cache: the folder ``huggingface_hub`` resolved must be
    ``<cache>/models--org--name/snapshots/<40-hex commit>``, and stay there once links are resolved.

    ``refs/main`` is a plain file in the cache; one holding ``../..`` or an absolute path would
    otherwise make a model load from anywhere on the disk.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    snapshots = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    where = f"the Hugging Face cache entry of {repo_id} ({snapshots.parent})"
    if not _COMMIT.fullmatch(snapshot.name) or snapshot.parent != snapshots and \
            Path(os.path.abspath(snapshot)).parent != Path(os.path.abspath(snapshots)):
        raise ModelError(f"{where} is corrupt: its revision resolves to {str(snapshot)[:200]!r}, not a commit hash "
                         "inside the cache (check refs/ in that folder); refusing to load it")
    try:
        inside = snapshot.resolve(strict=True).parent == snapshots.resolve(strict=True)
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise ModelError(f"{where} is corrupt: snapshot {snapshot.name} is a link out of the cache; refusing to load it")
    return snapshot
