"""Tiny synthetic ONNX models that insightface's model zoo loads as a real buffalo pack.

The real buffalo_l weights cannot be downloaded here, so tests build stand-ins
with the same interfaces and write them under ``<root>/models/<pack>/``:

* a detector in SCRFD's 9-output layout (3 strides x {scores, box distances,
  5 keypoints}, 2 anchors per cell, input 1x3x640x640), which insightface routes
  to its SCRFD class and decodes with its own code. It "finds" two faces at fixed
  places in the 640x640 detector canvas - a large one centred at (320, 320) and a
  smaller one at (96, 96) - scored by the input's contrast, so a flat image has
  no face;
* a recognizer with input 1x3x112x112 and output 1x512 (8x8 average pool,
  flatten, fixed random projection), which insightface routes to ArcFaceONNX.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2
OPSET = 17

# (stride, cell x, cell y, box side in px) of the two synthetic faces.
FACES = ((32, 10, 10, 200.0), (16, 6, 6, 80.0))
# 5 keypoints (eyes, nose, mouth corners) relative to the box centre, as fractions of its side.
KPS = np.array([[-0.18, -0.12], [0.18, -0.12], [0.0, 0.05], [-0.14, 0.22], [0.14, 0.22]], np.float32)


def _detector_outputs() -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per-stride score masks, box distances and keypoint offsets (in stride units)."""
    scores, boxes, kpss = [], [], []
    for stride in STRIDES:
        cells = DET_SIZE // stride
        n = cells * cells * ANCHORS
        s = np.zeros((n, 1), np.float32)
        b = np.ones((n, 4), np.float32)  # harmless tiny boxes where the score is 0
        k = np.zeros((n, 10), np.float32)
        for f_stride, cx, cy, side in FACES:
            if f_stride != stride:
                continue
            i = (cy * cells + cx) * ANCHORS  # first anchor of that cell
            s[i, 0] = 1.0
            b[i, :] = side / 2 / stride
            k[i, :] = (KPS * side / stride).reshape(-1)
        scores.append(s)
        boxes.append(b)
        kpss.append(k)
    return scores, boxes, kpss


def make_detector() -> onnx.ModelProto:
    """SCRFD-layout detector; outputs ordered scores(8,16,32), boxes(...), kps(...)."""
    scores, boxes, kpss = _detector_outputs()
    inits, nodes, outputs = [], [], []
    # contrast = min(max(x) - min(x), 1) * 0.9  ->  0 on a flat image, 0.9 on a photo
    nodes += [
        helper.make_node("ReduceMax", ["input.1"], ["xmax"], keepdims=0),
        helper.make_node("ReduceMin", ["input.1"], ["xmin"], keepdims=0),
        helper.make_node("Sub", ["xmax", "xmin"], ["range"]),
        helper.make_node("Min", ["range", "one"], ["range1"]),
        helper.make_node("Mul", ["range1", "gain"], ["contrast"]),
    ]
    inits += [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(0.9, np.float32), "gain")]
    for kind, arrays in (("score", scores), ("bbox", boxes), ("kps", kpss)):
        for stride, arr in zip(STRIDES, arrays):
            const, out = f"{kind}_{stride}_const", f"{kind}_{stride}"
            inits.append(numpy_helper.from_array(arr, const))
            if kind == "score":
                nodes.append(helper.make_node("Mul", [const, "contrast"], [out]))
            else:
                nodes.append(helper.make_node("Identity", [const], [out]))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(
        nodes, "synthetic_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
        outputs, initializer=inits,
    )
    return _finish(graph)


def make_recognizer(dim: int = 512, seed: int = 0) -> onnx.ModelProto:
    """ArcFace-shaped recognizer: 1x3x112x112 -> 1x``dim``, a fixed random projection."""
    w = np.random.default_rng(seed).standard_normal((3 * 14 * 14, dim)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes, "synthetic_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, dim])],
        initializer=[numpy_helper.from_array(w, "proj")],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # loadable by any onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model


def write_pack(root: Path, pack: str = "buffalo_l", detector: bool = True, recognizer: bool = True,
               det_name: str = "det_10g.onnx", rec_name: str = "w600k_r50.onnx") -> Path:
    """Write the synthetic models as ``<root>/models/<pack>/``; return that folder."""
    folder = Path(root) / "models" / pack
    folder.mkdir(parents=True, exist_ok=True)
    if detector:
        onnx.save(make_detector(), str(folder / det_name))
    if recognizer:
        onnx.save(make_recognizer(), str(folder / rec_name))
    return folder
