"""Image loading for the faces layer: any picture in, one H x W x 3 uint8 RGB array out.

Face embedders only ever see the array this module produces, so every input
quirk is settled here once: EXIF orientation (phone photos are stored sideways
and only *displayed* upright), alpha (composited on white, like a viewer would
show it), grayscale / palette / CMYK / 16-bit modes, and hostile files
(decompression bombs, truncated or non-image files). Everything the user can get
wrong raises :class:`~lorasynth.errors.ImageError` with the path in the message.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from lorasynth.errors import ImageError

#: Largest image (in pixels) that :func:`load_image` accepts by default: 50 MP is far above
#: any portrait photo. A full-size decode peaks at ~10 bytes a pixel (Pillow's 4-byte pixels,
#: the 3-byte array and one transfer copy): ~500 MB at 49 MP (measured).
DEFAULT_MAX_PIXELS = 50_000_000
#: Face detection decodes larger images at a reduced size (:func:`load_image_scaled`): JPEGs
#: are scaled inside the decoder (1/2, 1/4, 1/8), so a 49 MP JPEG peaks at ~150 MB; other formats
#: are reduced right after one full decode (~270 MB at 49 MP, measured).
DEFAULT_DECODE_PIXELS = 12_000_000

ImageInput = Union[str, os.PathLike, np.ndarray]

_WHITE = (255, 255, 255)


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 RGB array.

    Accepts anything Pillow reads (first frame of animations / multi-page files).
    EXIF orientation is applied so the array is upright. The declared size is
    checked against ``max_pixels`` *before* decoding, so a decompression bomb
    costs nothing; ``None`` disables lorasynth's limit (Pillow's own hard limit
    still applies).
    """
    return load_image_scaled(path, max_pixels, None)[0]


def load_image_scaled(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, decode_pixels: int | None = DEFAULT_DECODE_PIXELS
) -> tuple[np.ndarray, tuple[float, float]]:
    """Like :func:`load_image`, but an image above ``decode_pixels`` is decoded smaller.

    Returns ``(rgb, (sx, sy))``: multiply x / y coordinates in ``rgb`` by ``sx`` / ``sy`` to get
    pixels of the upright full-size image. JPEGs are reduced inside the decoder (draft mode), so
    the full-size image is never in memory.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image file not found: {p}")
    if not p.is_file():
        raise ImageError(f"{p} is not a readable image: not a file")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                check_size(p, im.size, max_pixels)
                im.seek(0)
                full = im.size
                orientation = _orientation(im)  # read before any reduce: a reduced copy has no EXIF
                if decode_pixels is not None and full[0] * full[1] > decode_pixels and im.format == "JPEG":
                    k = (full[0] * full[1] / decode_pixels) ** 0.5
                    im.draft("RGB", (max(1, int(full[0] / k)), max(1, int(full[1] / k))))
                im.load()
                if decode_pixels is not None and im.size[0] * im.size[1] > 1.25 * decode_pixels:  # draft may overshoot a bit
                    factor = int(np.ceil((im.size[0] * im.size[1] / decode_pixels) ** 0.5))
                    im = im.reduce(factor)
                sx, sy = full[0] / im.size[0], full[1] / im.size[1]
                if orientation in _TRANSPOSE:
                    im = im.transpose(_TRANSPOSE[orientation])
                    if orientation >= 5:  # rotated by 90 degrees: the axes swap
                        sx, sy = sy, sx
                return pil_to_rgb(im), (sx, sy)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{p} refused: image is too large to decode safely ({exc})") from exc
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        # UnidentifiedImageError (not an image), OSError "image file is truncated",
        # broken EXIF / chunk data (ValueError, SyntaxError) all land here.
        raise ImageError(f"{p} is not a readable image: {exc}") from exc


#: EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; unreadable EXIF counts as upright)."""
    try:
        value = im.getexif().get(0x0112, 1)
        return value if isinstance(value, int) else 1
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, struct.error):
        return 1


def check_size(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse images whose *declared* size exceeds ``max_pixels`` (decompression bombs)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{path} is not a readable image: empty size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{path} refused: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the limit of "
            f"{max_pixels / 1e6:.1f} MP (possible decompression bomb); downscale the image first"
        )


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to an H x W x 3 uint8 RGB array.

    Transparent pixels are composited on white; 16-bit and float grayscale are
    rescaled to 0..255 rather than clipped (Pillow's ``convert`` would clip).
    """
    mode = im.mode
    if mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.float64) / 257.0
        return as_rgb_array(np.clip(np.rint(wide), 0, 255).astype(np.uint8))
    if mode in ("I", "F"):
        return as_rgb_array(np.asarray(im))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in im.info
    ) or (mode in ("L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def as_rgb_array(image: np.ndarray) -> np.ndarray:
    """Validate an in-memory image and return it as a contiguous H x W x 3 uint8 RGB array.

    Accepted: H x W (gray), H x W x 1, H x W x 3 (RGB) and H x W x 4 (RGBA,
    composited on white). dtypes: uint8 as is; uint16 / large integer values are
    scaled from 0..65535; floats are read as 0..1 when their max is <= 1, else
    as 0..255. A uint8 RGB input that is already contiguous is returned without a copy.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an image array, got {type(image).__name__}")
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"expected an H x W, H x W x 3 or H x W x 4 image array, got shape {image.shape}")
    arr = _to_uint8(arr)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        rgb = arr[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        arr = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map a numeric image array to uint8 (see :func:`as_rgb_array` for the rules)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageError("image array contains NaN or infinite values")
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and int(arr.max()) > 255:
            return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ImageError(f"unsupported image array dtype {arr.dtype}")


def read_rgb(image_or_path: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return an RGB uint8 array for either a file path or an in-memory array."""
    if isinstance(image_or_path, np.ndarray):
        return as_rgb_array(image_or_path)
    if isinstance(image_or_path, Image.Image):
        return pil_to_rgb(ImageOps.exif_transpose(image_or_path) or image_or_path)
    if isinstance(image_or_path, (str, os.PathLike)):
        return load_image(image_or_path, max_pixels=max_pixels)
    raise ImageError(f"expected an image path or array, got {type(image_or_path).__name__}")


def describe_source(image_or_path: object) -> str:
    """Human label for error messages: the path, or 'the given image' for arrays."""
    if isinstance(image_or_path, (str, os.PathLike)):
        return str(image_or_path)
    return "the given image"
