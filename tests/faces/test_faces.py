"""Tests for lorasynth.faces: image loading, dlib on real photos, ArcFace on synthetic ONNX models.

Real photos are read from installed packages (never copied into the repo):
scikit-image's astronaut (one face) and insightface's t1.jpg (six people).
"""

from __future__ import annotations

import itertools
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorasynth.errors import FaceError, ImageError, LorasynthError
from lorasynth.faces import (
    EMBEDDER_NAMES,
    Face,
    FaceSelection,
    as_rgb_array,
    clear_embedder_cache,
    cosine_similarity,
    get_embedder,
    load_image,
)

try:  # tests/ may or may not be a package
    from tests.faces_onnx_models import write_pack
except ImportError:  # pragma: no cover
    from faces_onnx_models import write_pack

skimage_data = pytest.importorskip("skimage.data")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def t1_path() -> Path:
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def dlib_emb():
    return get_embedder("dlib")


@pytest.fixture(scope="module")
def astro_face(dlib_emb, astronaut) -> Face:
    return dlib_emb.embed(astronaut)


@pytest.fixture(scope="module")
def t1_faces(dlib_emb, t1_path) -> list[Face]:
    return dlib_emb.detect_and_embed(t1_path)


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


# --------------------------------------------------------------------------- images

def test_load_image_rgb_uint8(tmp_path, astronaut):
    p = _save(tmp_path, "a.png", Image.fromarray(astronaut))
    arr = load_image(p)
    assert arr.dtype == np.uint8 and arr.shape == astronaut.shape
    assert np.array_equal(arr, astronaut)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high
    stored[:10, :10] = (255, 0, 0)  # red block at the stored top-left
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = _save(tmp_path, "rot.jpg", im, exif=exif, quality=95)
    arr = load_image(p)
    assert arr.shape == (40, 20, 3)
    # After a clockwise turn the stored top-left lands at the top-right.
    assert arr[:10, -10:, 0].mean() > 200 and arr[:10, :10, 0].mean() < 60


def test_exif_rotated_photo_still_finds_the_face(tmp_path, dlib_emb, astronaut, astro_face):
    sideways = np.ascontiguousarray(np.rot90(astronaut, 1))  # stored rotated 90 CCW
    im = Image.fromarray(sideways)
    exif = im.getexif()
    exif[0x0112] = 6
    p = _save(tmp_path, "astro_rot.jpg", im, exif=exif, quality=95)
    face = dlib_emb.embed(p)
    assert cosine_similarity(face.embedding, astro_face.embedding) > 0.9


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)  # opaque blue left half, transparent right half
    arr = load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert arr.shape == (8, 8, 3)
    assert (arr[:, :4] == (0, 0, 255)).all() and (arr[:, 4:] == 255).all()
    assert (as_rgb_array(rgba) == arr).all()


def test_grayscale_palette_and_16bit(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    arr = load_image(_save(tmp_path, "g.png", Image.fromarray(gray, "L")))
    assert arr.shape == (8, 8, 3) and (arr[..., 0] == gray).all() and (arr[..., 2] == gray).all()
    pal = load_image(_save(tmp_path, "p.gif", Image.fromarray(gray, "L").convert("P")))
    assert pal.shape == (8, 8, 3)
    wide = (gray.astype(np.uint16) * 257)
    arr16 = load_image(_save(tmp_path, "w.png", Image.fromarray(wide)))
    assert np.abs(arr16[..., 0].astype(int) - gray).max() <= 1
    assert as_rgb_array(gray[:, :, None]).shape == (8, 8, 3)
    assert as_rgb_array(gray.astype(np.float32) / 255.0)[3, 3, 1] == gray[3, 3]


def test_grayscale_photo_finds_the_face(tmp_path, dlib_emb, astronaut):
    p = _save(tmp_path, "gray.png", Image.fromarray(astronaut).convert("L"))
    assert len(dlib_emb.detect_and_embed(p)) == 1


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, not a picture\n")
    with pytest.raises(ImageError, match="is not a readable image"):
        load_image(p)


def test_truncated_png(tmp_path, astronaut):
    full = _save(tmp_path, "full.png", Image.fromarray(astronaut))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="is not a readable image"):
        load_image(cut)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError):
        load_image(tmp_path)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that declares a huge size (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_refused(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10 GP declared, 60 bytes on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no Pillow warning leaks out
        with pytest.raises(ImageError, match="too large|exceeds the limit"):
            load_image(bomb)
    mid = _png_header_only(tmp_path / "mid.png", 10_000, 6_000)  # 60 MP: above lorasynth's 50 MP
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(mid)


def test_pixel_limit_parameter(tmp_path):
    p = _save(tmp_path, "small.png", Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(p, max_pixels=1000)
    assert load_image(p, max_pixels=None).shape == (100, 100, 3)


def test_bad_arrays():
    with pytest.raises(ImageError):
        as_rgb_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError):
        as_rgb_array(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ImageError):
        as_rgb_array([[1, 2], [3, 4]])


# --------------------------------------------------------------------------- factory

def test_factory_names_and_cache():
    assert set(EMBEDDER_NAMES) == {"dlib", "arcface"}
    with pytest.raises(LorasynthError, match="dlib, arcface"):
        get_embedder("facenet")
    assert get_embedder("dlib") is get_embedder("DLIB")


# --------------------------------------------------------------------------- dlib on real photos

def test_dlib_astronaut_one_face(dlib_emb, astronaut, astro_face):
    assert dlib_emb.name == "dlib" and dlib_emb.dim == 128
    faces = dlib_emb.detect_and_embed(astronaut)
    assert len(faces) == 1
    e = astro_face.embedding
    assert e.dtype == np.float32 and e.shape == (128,)
    assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5
    assert np.allclose(faces[0].embedding, e)  # deterministic
    x0, y0, x1, y1 = astro_face.box
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert astro_face.landmarks.shape == (5, 2)


def test_dlib_identity_separation(dlib_emb, astronaut, astro_face, t1_faces):
    assert len(t1_faces) == 6
    areas = [f.area for f in t1_faces]
    assert areas == sorted(areas, reverse=True)
    mirror = dlib_emb.embed(np.ascontiguousarray(astronaut[:, ::-1]))
    same = cosine_similarity(astro_face.embedding, mirror.embedding)
    assert same >= 0.9
    pairs = [float(a.embedding @ b.embedding) for a, b in itertools.combinations(t1_faces, 2)]
    assert len(pairs) == 15
    assert max(pairs) < same, (max(pairs), same)


def test_face_index_selects_another_face(dlib_emb, astronaut, t1_path, t1_faces):
    other = dlib_emb.embed_with_report(t1_path, face_index=3)
    assert other.n_faces == 6 and other.index == 3
    assert other.describe() == "6 faces found, used the 4th largest (index 3)"
    assert np.allclose(other.face.embedding, t1_faces[3].embedding)
    assert float(other.face.embedding @ t1_faces[0].embedding) < 0.99
    assert FaceSelection(t1_faces[0], 0, 6).describe() == "6 faces found, used the largest (index 0)"
    with pytest.raises(FaceError, match="1 face was found"):
        dlib_emb.embed(astronaut, face_index=1)


def test_dlib_no_face(dlib_emb, tmp_path):
    p = _save(tmp_path, "gray.png", Image.new("RGB", (256, 256), (128, 128, 128)))
    with pytest.raises(FaceError, match=f"no face found in {p}"):
        dlib_emb.embed(p)
    with pytest.raises(FaceError, match="no face found in the given image"):
        dlib_emb.embed(np.full((64, 64, 3), 128, np.uint8))


def test_image_errors_pass_through_embed(dlib_emb, tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"not a jpeg")
    with pytest.raises(ImageError):
        dlib_emb.embed(p)


def test_dlib_missing_model_files(tmp_path):
    with pytest.raises(FaceError, match="shape_predictor_5_face_landmarks.dat"):
        get_embedder("dlib", model_root=tmp_path)


def test_dlib_detector_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch, astronaut):
    """The serialized HOG detector (loads in ms instead of ~0.4 s) finds exactly what dlib's own does."""
    import types

    import dlib

    from lorasynth.faces.dlib_embedder import frontal_face_detector

    def boxes(det):
        rects, scores, _ = det.run(astronaut, 0, 0.0)
        return [(r.left(), r.top(), r.right(), r.bottom()) for r in rects], list(scores)

    def must_not_build():
        raise AssertionError("the cached detector was not used")

    reference = boxes(dlib.get_frontal_face_detector())
    assert reference[0]
    monkeypatch.setenv("LORASYNTH_CACHE", str(tmp_path / "cache"))
    assert boxes(frontal_face_detector(dlib)) == reference  # built, then written to the cache
    (cached,) = (tmp_path / "cache" / "dlib").glob("frontal_face_detector-*.svm")
    no_builder = types.SimpleNamespace(__version__=dlib.__version__, fhog_object_detector=dlib.fhog_object_detector,
                                       get_frontal_face_detector=must_not_build)
    assert boxes(frontal_face_detector(no_builder)) == reference  # loaded from the file
    size = cached.stat().st_size
    cached.write_bytes(b"damaged")
    assert boxes(frontal_face_detector(dlib)) == reference and cached.stat().st_size == size  # rebuilt, rewritten
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("LORASYNTH_CACHE", str(tmp_path / "a_file"))  # an unusable cache folder
    assert boxes(frontal_face_detector(dlib)) == reference


# --------------------------------------------------------------------------- arcface on synthetic ONNX

@pytest.fixture(scope="module")
def arcface_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface_root")
    write_pack(root)
    return root


@pytest.fixture(scope="module")
def arc_emb(arcface_root):
    return get_embedder("arcface", model_root=arcface_root)


def test_arcface_loads_through_insightface(arc_emb):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert arc_emb.name == "arcface" and arc_emb.dim == 512
    assert isinstance(arc_emb._app.models["detection"], SCRFD)
    assert isinstance(arc_emb._app.models["recognition"], ArcFaceONNX)


def test_arcface_embedding(arc_emb, astronaut, t1_path):
    a = arc_emb.embed(astronaut)
    assert a.embedding.dtype == np.float32 and a.embedding.shape == (512,)
    assert abs(float(np.linalg.norm(a.embedding)) - 1.0) < 1e-5
    assert np.array_equal(arc_emb.embed(astronaut).embedding, a.embedding)  # deterministic
    b = arc_emb.embed(t1_path)
    assert float(a.embedding @ b.embedding) < 0.99
    # The synthetic detector's large face: 200 px box at the 640 canvas centre, 512 px image -> scale 0.8.
    assert np.allclose(a.box, (176, 176, 336, 336), atol=1)


def test_arcface_face_index_and_no_face(arc_emb, astronaut):
    sel = arc_emb.embed_with_report(astronaut, face_index=1)
    assert sel.n_faces == 2 and sel.face.area < arc_emb.embed(astronaut).area
    with pytest.raises(FaceError, match="2 faces were found"):
        arc_emb.embed(astronaut, face_index=2)
    with pytest.raises(FaceError, match="no face found"):
        arc_emb.embed(np.full((320, 320, 3), 90, np.uint8))


def test_arcface_missing_models(tmp_path, monkeypatch):
    clear_embedder_cache()
    pack = tmp_path / "models" / "buffalo_l"
    with pytest.raises(FaceError) as err:
        get_embedder("arcface", model_root=tmp_path)
    msg = str(err.value)
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg and f"{pack}/" in msg
    assert "never downloads" in msg
    assert not (tmp_path / "models").exists()  # nothing created, no download attempted

    env_root = tmp_path / "env_root"
    monkeypatch.setenv("LORASYNTH_INSIGHTFACE_ROOT", str(env_root))
    with pytest.raises(FaceError, match=str(env_root / "models" / "buffalo_l")):
        get_embedder("arcface")


def test_arcface_partial_pack(tmp_path):
    write_pack(tmp_path, recognizer=False)
    with pytest.raises(FaceError, match="no recognition model.*w600k_r50.onnx"):
        get_embedder("arcface", model_root=tmp_path)
    other = tmp_path / "o"
    write_pack(other, detector=False)
    with pytest.raises(FaceError, match="no detection model.*det_10g.onnx"):
        get_embedder("arcface", model_root=other)


def test_arcface_corrupt_model(tmp_path):
    folder = write_pack(tmp_path, detector=False)
    (folder / "det_10g.onnx").write_bytes(b"this is not onnx")
    with pytest.raises(FaceError, match="could not load the insightface models"):
        get_embedder("arcface", model_root=tmp_path)
