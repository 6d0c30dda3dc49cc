"""Read the weights2weights (w2w) identity-LoRA dataset without unpickling anything untrusted.

The dataset (Hugging Face ``snap-research/weights2weights``) ships:

* ``all_weights.pt``: a ``torch.save``'d float32 tensor, N x 99,648 (N = 64,974; 26 GB).
  Opened with ``torch.load(mmap=True, weights_only=True)``: rows are paged in on demand,
  never the whole file, and the restricted unpickler cannot run code.
* ``weight_dimensions.pt``: an ordered dict ``peft key -> (element count, torch.Size)``
  giving the row layout (w2w's own ``unflatten`` walks it in order). Loaded with
  ``weights_only=True`` too, and checked against :meth:`Layout.w2w`.
* ``identity_df.pt``: a pickled pandas DataFrame of CelebA attributes (+1/-1). A pickle can
  run arbitrary code, so it is only read when the caller passes ``trust_pickle=True``.

Row layout: per module ``lora_A`` (1 x in) then ``lora_B`` (out x 1), modules in sorted
peft key order, rank 1, ``lora_alpha = 27``: each module's update is ``27 * B @ A``.
:meth:`W2WDataset.row_to_lora` returns exactly that LoRA (alpha 27, factors as stored).
"""

from __future__ import annotations

import math
import os
import pickle
import stat
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from lorasynth.errors import FormatError
from lorasynth.core.layout import W2W_ALPHA, Layout
from lorasynth.core.lora import LoRA, LoRAModule
from lorasynth.core.safe_io import check_input_file, open_input

WEIGHTS_FILE = "all_weights.pt"
DIMS_FILE = "weight_dimensions.pt"
IDENTITY_FILE = "identity_df.pt"
# where the files sit in the Hugging Face repo, relative to a root the user may pass
SEARCH_DIRS = (".", "files", "weights_datasets/identities", "weights_datasets", "identities")

_KEY_PREFIXES = ("base_model.model.", "unet.")
_KEY_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
}


class UntrustedPickleWarning(UserWarning):
    """Emitted when a pickle is unpickled on the user's explicit request."""


def find_file(root: str | os.PathLike, name: str) -> Path | None:
    """``name`` in ``root`` or one of the dataset's usual sub-folders, else None."""
    root = Path(root)
    if root.is_file():
        root = root.parent
    for sub in SEARCH_DIRS:
        p = root / sub / name
        if p.is_file():
            return p
    return None


def w2w_key_to_module(key: str) -> tuple[str, str] | None:
    """``base_model.model.<path>.lora_A.weight`` -> (``unet.<path>``, ``down``); None if not a LoRA key.

    Accepts keys with or without the ``base_model.model.`` and ``unet.`` prefixes and
    the peft (``lora_A``/``lora_B``, optionally ``.default``) or kohya-style
    (``lora_down``/``lora_up``) suffixes.
    """
    path = key
    for prefix in _KEY_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
    for suffix, part in _KEY_SUFFIXES.items():
        if path.endswith(suffix):
            return "unet." + path[: -len(suffix)], part
    return None


def _numel(value, key: str) -> tuple[int, tuple[int, ...]]:
    """Parse one ``weight_dimensions`` value: ``(count, torch.Size)``; count may be an int or a 1-element size."""
    try:
        count, shape = value
        if not isinstance(count, int):
            count = count[0]
        return int(count), tuple(int(d) for d in shape)
    except (TypeError, ValueError, IndexError):
        raise FormatError(f"{DIMS_FILE}: entry {key!r} is not (element count, shape): {value!r}") from None


def check_weight_dimensions(dims: Mapping, layout: Layout | None = None) -> None:
    """Raise FormatError unless ``dims`` (key -> (count, shape), in row order) matches ``layout``.

    Every key must map to a module of the layout, in the same order (A then B per
    module), with the same shapes; the first disagreement is named with its row offset.
    """
    layout = layout or Layout.w2w()
    expected = []
    for spec in layout.modules:
        expected += [(spec.name, "down", spec.down_shape), (spec.name, "up", spec.up_shape)]
    keys = list(dims.keys())
    if len(keys) != len(expected):
        raise FormatError(
            f"{DIMS_FILE} lists {len(keys)} tensors; the w2w layout has {len(expected)} "
            f"({len(layout)} modules x lora_A/lora_B)"
        )
    offset = 0
    for i, (key, (name, part, shape)) in enumerate(zip(keys, expected)):
        parsed = w2w_key_to_module(str(key))
        if parsed is None:
            raise FormatError(f"{DIMS_FILE}: key {key!r} is not a LoRA weight key (lora_A/lora_B)")
        count, got_shape = _numel(dims[key], str(key))
        if parsed != (name, part):
            raise FormatError(
                f"{DIMS_FILE}: tensor #{i} (row offset {offset}) is {key!r}; the w2w layout expects "
                f"{name} {'lora_A' if part == 'down' else 'lora_B'} there (order or names differ)"
            )
        if got_shape != tuple(shape) or count != math.prod(shape):
            raise FormatError(
                f"{DIMS_FILE}: {key!r} has {count} elements of shape {got_shape}; the w2w layout expects "
                f"{math.prod(shape)} of shape {tuple(shape)}"
            )
        offset += count
    if offset != layout.size:
        raise FormatError(f"{DIMS_FILE} adds up to {offset} values per row; the w2w layout has {layout.size}")


def _safe_load(path: Path, what: str, mmap: bool = False):
    """``torch.load(weights_only=True)``; every failure becomes one clear FormatError."""
    check_input_file(path, what)  # a FIFO, device or folder is named, never opened
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{path}: {what} could not be loaded in PyTorch's safe mode (weights_only=True): it holds "
            f"objects other than tensors and plain containers ({first}). lorasynth will not unpickle it "
            f"(that could run code)."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        hint = " (memory-mapping needs the zip format of torch.save >= 1.6)" if mmap else ""
        raise FormatError(f"{path}: cannot read {what}{hint}: {e}") from None


def _plain(value):
    """A JSON-friendly Python value (numpy/torch scalars -> int/float/bool; others -> str)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    return str(value)


def _records(obj) -> list[dict]:
    """Rows of a DataFrame, a dict of columns, or a list of dicts, as plain dicts."""
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas DataFrame
        rows = obj.to_dict("records")
    elif isinstance(obj, Mapping):
        cols = {str(k): list(v) for k, v in obj.items()}
        n = len(next(iter(cols.values()), []))
        if any(len(v) != n for v in cols.values()):
            raise FormatError(f"{IDENTITY_FILE}: columns have different lengths")
        rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    elif isinstance(obj, (list, tuple)) and all(isinstance(r, Mapping) for r in obj):
        rows = list(obj)
    else:
        raise FormatError(f"{IDENTITY_FILE}: expected a DataFrame of attributes, got {type(obj).__name__}")
    return [{str(k): _plain(v) for k, v in r.items()} for r in rows]


def load_identity_table(path: str | os.PathLike, trust_pickle: bool = False, order: str = "file") -> list[dict]:
    """Per-row CelebA attributes from ``identity_df.pt`` (a pickle: needs ``trust_pickle=True``).

    ``order="file"``: records are sorted by ``str(file)``, matching the rows, which are
    sorted by training-folder name and whose ``file`` attribute is that folder's number
    (per the w2w notebooks; the exact correspondence is unconfirmed). ``order="position"``
    keeps the table's own order. Unpickling a DataFrame needs pandas installed.
    """
    path = Path(path)
    if not trust_pickle:
        raise FormatError(
            f"{path} is a pickle (a pandas DataFrame); unpickling can run arbitrary code, so lorasynth "
            "does not load it by default. Pass trust_pickle=True (CLI: --trust-pickle) only if you trust the file."
        )
    if order not in ("file", "position"):
        raise FormatError(f"identity order must be 'file' or 'position', got {order!r}")
    warnings.warn(
        f"unpickling {path} on request (trust_pickle=True): this runs any code the file contains",
        UntrustedPickleWarning,
        stacklevel=2,
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise FormatError(f"{path}: unpickling needs the '{e.name}' package (pip install {e.name})") from None
    except Exception as e:  # an untrusted pickle can raise anything
        raise FormatError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from None
    rows = _records(obj)
    if order == "file" and rows and all("file" in r for r in rows):
        rows = sorted(rows, key=lambda r: str(r["file"]))
    return rows


def split_row(vec: torch.Tensor, layout: Layout, alpha: float) -> LoRA:
    """``layout.unflatten(vec, alpha)`` as views into ``vec`` (one split instead of a copy per tensor).

    The caller passes a private copy; importing many rows is dominated by per-tensor
    overhead, which this halves.
    """
    if vec.ndim != 1 or vec.shape[0] != layout.size:
        raise FormatError(f"row of shape {tuple(vec.shape)} does not match the w2w layout size {layout.size}")
    sizes = [n for spec in layout.modules for n in (math.prod(spec.down_shape), math.prod(spec.up_shape))]
    pieces = torch.split(vec, sizes)
    modules = {}
    for i, spec in enumerate(layout.modules):
        modules[spec.name] = LoRAModule(pieces[2 * i].view(spec.down_shape), pieces[2 * i + 1].view(spec.up_shape), alpha)
    return LoRA(modules)


class W2WDataset:
    """Random access to w2w rows as LoRAs, memory-mapped (RSS stays small for any N).

    ``root`` is the folder holding ``all_weights.pt`` (or the repo root: the usual
    sub-folders are searched); explicit paths override the search.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        trust_pickle: bool = False,
        weights_path: str | os.PathLike | None = None,
        dims_path: str | os.PathLike | None = None,
        identity_path: str | os.PathLike | None = None,
        identity_order: str = "file",
    ):
        self.root = Path(root)
        self.layout = Layout.w2w()
        self.trust_pickle = trust_pickle
        self.identity_order = identity_order
        wp = Path(weights_path) if weights_path else find_file(self.root, WEIGHTS_FILE)
        if wp is None or not wp.is_file():
            raise FormatError(f"{self.root}: no {WEIGHTS_FILE} found (looked in {', '.join(SEARCH_DIRS)})")
        self.weights_path = wp
        self.dims_path = Path(dims_path) if dims_path else find_file(self.root, DIMS_FILE)
        self.identity_path = Path(identity_path) if identity_path else find_file(self.root, IDENTITY_FILE)

        weights = _safe_load(wp, "the w2w weight matrix", mmap=True)
        if not isinstance(weights, torch.Tensor):
            raise FormatError(f"{wp}: expected one tensor (N x {self.layout.size}), got {type(weights).__name__}")
        if weights.ndim != 2 or weights.shape[1] != self.layout.size:
            raise FormatError(f"{wp}: tensor of shape {tuple(weights.shape)}; the w2w layout needs N x {self.layout.size}")
        if not weights.is_floating_point():
            raise FormatError(f"{wp}: tensor dtype {weights.dtype} is not floating point")
        self.weights = weights
        self._fd: int | None = None
        self._row_offset = self._locate_rows(wp, weights)

        self.weight_dimensions = None
        if self.dims_path is None:
            warnings.warn(
                f"{DIMS_FILE} not found beside {wp.name}: assuming the documented w2w row layout "
                "(sorted peft keys, lora_A then lora_B per module)",
                stacklevel=2,
            )
        else:
            dims = _safe_load(self.dims_path, "the w2w weight dimensions")
            if not isinstance(dims, Mapping):
                raise FormatError(f"{self.dims_path}: expected a dict key -> (count, shape), got {type(dims).__name__}")
            check_weight_dimensions(dims, self.layout)
            self.weight_dimensions = dims
        self._identity: list[dict] | None = None

    @staticmethod
    def _locate_rows(path: Path, weights: torch.Tensor) -> int | None:
        """Byte offset of row 0 inside the torch.save zip, or None (then rows come from the mmap).

        Copying a row out of torch's private memory map costs a page fault per 4 KB page,
        which made imports ~40x slower than a plain ``pread`` here. The offset is only
        trusted for a contiguous float32 tensor stored uncompressed as the file's single
        data record, and is checked against the mmap on row 0.
        """
        if weights.dtype != torch.float32 or not weights.is_contiguous() or len(weights) == 0:
            return None
        try:
            with zipfile.ZipFile(path) as zf:
                records = [i for i in zf.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
                if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
                    return None
                info = records[0]
            with open_input(path, "checkpoint") as (f, _):
                f.seek(info.header_offset)
                local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            nbytes = weights.untyped_storage().nbytes()
            if info.file_size != nbytes:
                return None
            offset = start + weights.storage_offset() * 4
            with open_input(path, "checkpoint") as (f, _):
                f.seek(offset)
                first = f.read(weights.shape[1] * 4)
            if first != weights[0].numpy().tobytes():
                return None
            return offset
        except (OSError, zipfile.BadZipFile, struct.error, RuntimeError, FormatError):
            return None

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "W2WDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def row(self, index: int) -> torch.Tensor:
        """Row ``index`` as a fresh float32 tensor (reads only that row from disk)."""
        n = len(self)
        if not -n <= index < n:
            raise FormatError(f"row {index} out of range (dataset has {n} rows)")
        index %= n
        if self._row_offset is None:
            return self.weights[index].to(torch.float32).clone()
        if self._fd is None:
            fd = os.open(self.weights_path, os.O_RDONLY | os.O_NONBLOCK)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FormatError(f"{self.weights_path}: no longer a regular file")
            self._fd = fd
        out = torch.empty(self.layout.size, dtype=torch.float32)
        want = self.layout.size * 4
        got = os.preadv(self._fd, [out.numpy()], self._row_offset + index * want)
        if got != want:
            raise FormatError(f"{self.weights_path}: short read of row {index} ({got} of {want} bytes); file truncated?")
        return out

    def row_to_lora(self, row: int | torch.Tensor) -> LoRA:
        """The LoRA of one row (an index or the row itself): rank 1, alpha 27, ``delta W = 27 B A``."""
        vec = self.row(row) if isinstance(row, int) else torch.as_tensor(row, dtype=torch.float32).clone()
        lora = split_row(vec, self.layout, W2W_ALPHA)
        lora.metadata["lorasynth.source"] = "weights2weights"
        if isinstance(row, int):
            lora.metadata["w2w.row"] = str(row if row >= 0 else len(self) + row)
        return lora

    def identity_attributes(self) -> list[dict] | None:
        """Per-row attribute dicts from ``identity_df.pt`` (None if the file is absent).

        Raises FormatError unless the dataset was opened with ``trust_pickle=True``.
        """
        if self.identity_path is None:
            return None
        if self._identity is None:
            self._identity = load_identity_table(self.identity_path, self.trust_pickle, self.identity_order)
            if len(self._identity) != len(self):
                warnings.warn(
                    f"{self.identity_path.name} has {len(self._identity)} rows, the weights {len(self)}; "
                    "rows beyond the shorter one get no attributes",
                    stacklevel=2,
                )
        return self._identity


def write_w2w_miniature(
    root: str | os.PathLike, rows: torch.Tensor, key_style: str = "peft", dims_format: str = "size"
) -> Path:
    """Write a small dataset in the exact w2w file layout (for tests and demos).

    ``rows`` is N x 99,648 float32. ``key_style`` "peft" writes ``base_model.model.<path>.lora_A.weight``
    keys, "unet" writes ``unet.<path>...``. ``dims_format`` "size" stores the count as a
    1-element ``torch.Size`` (as w2w's ``[key][0][0]`` indexing implies), "int" as an int.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layout = Layout.w2w()
    rows = torch.as_tensor(rows, dtype=torch.float32)
    if rows.ndim != 2 or rows.shape[1] != layout.size:
        raise FormatError(f"rows must be N x {layout.size}, got {tuple(rows.shape)}")
    torch.save(rows.contiguous(), root / WEIGHTS_FILE)
    prefix = "base_model.model." if key_style == "peft" else "unet."
    dims: dict = {}
    for spec in layout.modules:
        path = spec.name[len("unet."):]
        for tag, shape in (("lora_A", spec.down_shape), ("lora_B", spec.up_shape)):
            n = math.prod(shape)
            dims[f"{prefix}{path}.{tag}.weight"] = (torch.Size([n]) if dims_format == "size" else n, torch.Size(shape))
    torch.save(dims, root / DIMS_FILE)
    return root
