"""Tests for lorasynth.faces.dlib_resnet: the PyTorch port of dlib's face-recognition ResNet.

The reference is dlib's own ``compute_face_descriptor`` on the same aligned chips. Photos
come from installed packages (scikit-image's astronaut, insightface's t1.jpg with six people).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from lorasynth.errors import FaceError
from lorasynth.faces import get_embedder, load_image
from lorasynth.faces.dlib_embedder import (
    RECOGNITION_MODEL_FILE,
    SHAPE_PREDICTOR_FILE,
    DlibEmbedder,
    default_model_dir,
)
from lorasynth.faces.dlib_resnet import compute_descriptors, load_dlib_resnet, read_dlib_resnet

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dir() -> Path:
    folder = default_model_dir()
    assert folder is not None and (folder / RECOGNITION_MODEL_FILE).is_file()
    return folder


@pytest.fixture(scope="module")
def model_bytes(model_dir) -> bytes:
    return (model_dir / RECOGNITION_MODEL_FILE).read_bytes()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    spec = importlib.util.find_spec("insightface")  # importing insightface itself takes a second
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface (for its t1.jpg sample photo) is not installed")
    return load_image(Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg")


@pytest.fixture(scope="module")
def dlib_chips(model_dir):
    """``image -> (aligned chips, dlib's descriptors)`` with dlib's HOG + 5-point pipeline."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model_dir / SHAPE_PREDICTOR_FILE))
    recognizer = dlib.face_recognition_model_v1(str(model_dir / RECOGNITION_MODEL_FILE))

    def run(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shapes = dlib.full_object_detections()
        for rect in detector(img, 0):
            shapes.append(predictor(img, rect))
        reference = np.array([np.asarray(d) for d in recognizer.compute_face_descriptor(img, shapes, 1, 0.25)])
        return np.stack(dlib.get_face_chips(img, shapes, size=150, padding=0.25)), reference

    return run


def _assert_same_descriptors(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    for a, b in zip(ours.astype(np.float64), reference):
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.9999, cosine
        assert np.abs(a - b).max() < 1e-3


# --------------------------------------------------------------------------- parity with dlib

def test_descriptor_matches_dlib_on_astronaut(model_dir, dlib_chips, astronaut):
    chips, reference = dlib_chips(astronaut)
    assert len(chips) >= 1
    net = load_dlib_resnet(model_dir / RECOGNITION_MODEL_FILE)
    _assert_same_descriptors(compute_descriptors(net, chips), reference)


def test_descriptor_matches_dlib_on_six_faces(model_dir, dlib_chips, t1):
    chips, reference = dlib_chips(t1)
    assert len(chips) == 6
    net = load_dlib_resnet(model_dir / RECOGNITION_MODEL_FILE)
    _assert_same_descriptors(compute_descriptors(net, chips), reference)
    one_by_one = np.concatenate([compute_descriptors(net, c[None]) for c in chips])
    assert np.abs(one_by_one - compute_descriptors(net, chips)).max() < 1e-5


def test_loader_is_cached_and_inference_only(model_dir):
    net = load_dlib_resnet(model_dir / RECOGNITION_MODEL_FILE)
    assert load_dlib_resnet(str(model_dir / RECOGNITION_MODEL_FILE)) is net
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())


def test_bad_chips_rejected(model_dir):
    net = load_dlib_resnet(model_dir / RECOGNITION_MODEL_FILE)
    with pytest.raises(FaceError, match="150 x 150 x 3 uint8"):
        compute_descriptors(net, np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(FaceError, match="uint8"):
        compute_descriptors(net, np.zeros((1, 150, 150, 3), np.float32))
    assert compute_descriptors(net, np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)


# --------------------------------------------------------------------------- malformed files

def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / RECOGNITION_MODEL_FILE
    path.write_bytes(data)
    return path


def test_truncated_file(tmp_path, model_bytes):
    path = _write(tmp_path, model_bytes[: len(model_bytes) // 2])
    with pytest.raises(FaceError, match=r"not a valid dlib_face_recognition_resnet_model_v1 file.*file ends inside"):
        read_dlib_resnet(path)
    with pytest.raises(FaceError, match="truncated or corrupted"):
        load_dlib_resnet(_write(tmp_path, model_bytes[:40]))


def test_corrupted_file(tmp_path, model_bytes):
    with pytest.raises(FaceError, match=r"layer 0 \(con\) has version 'con_9', expected 'con_4'"):
        read_dlib_resnet(_write(tmp_path, model_bytes.replace(b"con_4", b"con_9", 1)))
    with pytest.raises(FaceError, match="unexpected bytes after the network"):
        read_dlib_resnet(_write(tmp_path, model_bytes + b"\x00"))
    with pytest.raises(FaceError, match="add_loss_layer version"):
        read_dlib_resnet(_write(tmp_path, os.urandom(64).replace(b"\x01", b"\x05")))
    with pytest.raises(FaceError, match="cannot read"):
        load_dlib_resnet(tmp_path / "missing.dat")


def test_embedder_reports_corrupted_model(tmp_path, model_dir, model_bytes):
    (tmp_path / SHAPE_PREDICTOR_FILE).symlink_to(model_dir / SHAPE_PREDICTOR_FILE)
    _write(tmp_path, model_bytes[:-100])
    with pytest.raises(FaceError, match="truncated or corrupted"):
        DlibEmbedder(model_root=tmp_path)


# --------------------------------------------------------------------------- the embedder backends

def test_embedder_backends_agree(astronaut):
    torch_face = get_embedder("dlib").embed(astronaut)
    dlib_face = get_embedder("dlib", backend="dlib").embed(astronaut)
    assert get_embedder("dlib").backend == "torch"
    assert torch_face.box == dlib_face.box
    assert float(torch_face.embedding @ dlib_face.embedding) > 0.9999
    assert np.abs(torch_face.embedding - dlib_face.embedding).max() < 1e-4


def test_jitter_falls_back_to_dlib(astronaut):
    jittered = DlibEmbedder(num_jitters=2).embed(astronaut)
    reference = DlibEmbedder(num_jitters=2, backend="dlib").embed(astronaut)
    assert np.array_equal(jittered.embedding, reference.embedding)  # dlib's jitter RNG is seeded


def test_unknown_backend():
    with pytest.raises(FaceError, match="valid: torch, dlib"):
        DlibEmbedder(backend="onnx")
