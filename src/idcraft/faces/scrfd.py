"""SCRFD face detector (insightface's ``det_10g.onnx`` / ``scrfd_10g_bnkps.onnx``) run with onnxruntime.

Pre- and post-processing follow insightface's ``model_zoo/scrfd.py`` so boxes and keypoints match what
FaceID/InstantID were built with:

* letterbox: scale the image to fit the square detector input keeping its aspect ratio (bilinear), paste it
  in the top-left corner of a black canvas; ``det_scale`` maps detector pixels back to the image;
* input ``(pixel - 127.5) / 128`` in RGB order, NCHW (insightface feeds BGR with ``swapRB=True``; idcraft
  images are RGB already);
* outputs: scores, box distances, keypoint distances for each stride (8, 16, 32 with 2 anchors per location,
  or 8..128 with 1), optionally with a leading batch axis; anchor centres are ``(x, y) * stride`` of every
  feature-map cell, repeated per anchor; distances are in stride units;
* keep scores >= 0.5, greedy NMS at IoU 0.4 with insightface's ``+1`` pixel area convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceError
from ._optional import cv2 as _cv2

#: Outputs count -> (strides, anchors per location, has keypoints), as insightface's SCRFD decides.
_LAYOUTS: dict[int, tuple[tuple[int, ...], int, bool]] = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}

#: Side of SCRFD's smallest anchor (stride 8) in detector pixels: faces much smaller are not found.
SMALLEST_ANCHOR = 16


def letterbox(rgb: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """``rgb`` scaled to fit ``input_size = (width, height)`` and padded bottom/right with black."""
    cv2 = _cv2()
    in_w, in_h = input_size
    height, width = rgb.shape[:2]
    if height / width > in_h / in_w:
        new_h = in_h
        new_w = int(new_h / (height / width))
    else:
        new_w = in_w
        new_h = int(new_w * (height / width))
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    det_scale = new_h / height
    canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h))
    return canvas, det_scale


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """``(height*width*num_anchors, 2)`` anchor centres ``(x, y)`` in detector pixels, row-major, anchors
    of one location consecutive."""
    ys, xs = np.mgrid[:height, :width]
    centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    if num_anchors > 1:
        centers = np.repeat(centers, num_anchors, axis=0)
    return centers


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Boxes from anchor centres and (left, top, right, bottom) distances."""
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Keypoints ``(N, K, 2)`` from anchor centres and per-point (dx, dy) offsets ``(N, 2K)``."""
    offsets = distance.reshape(distance.shape[0], distance.shape[1] // 2, 2)
    return points[:, None, :] + offsets


def nms(dets: np.ndarray, threshold: float) -> list[int]:
    """Indices of ``dets`` (``Nx5``: box + score) kept by greedy non-maximum suppression at IoU ``threshold``.

    Areas use insightface's ``(x2 - x1 + 1) * (y2 - y1 + 1)`` pixel convention so the same boxes survive.
    """
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return keep


class SCRFD:
    """One SCRFD ONNX session and the decoding of its outputs."""

    def __init__(self, session: Any, path: str | Path) -> None:
        self.session = session
        self.path = Path(path)
        inputs = session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise FaceError(f"{self.path}: not an SCRFD face detector (expected one NCHW image input).")
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2:4]
        #: ``(width, height)`` when the model was exported for one input size; None when it takes any.
        self.fixed_input_size: tuple[int, int] | None = (
            (int(width), int(height)) if isinstance(width, int) and isinstance(height, int) else None
        )
        outputs = session.get_outputs()
        self.output_names = [output.name for output in outputs]
        if len(outputs) not in _LAYOUTS:
            raise FaceError(
                f"{self.path}: not an SCRFD face detector ({len(outputs)} outputs; SCRFD has 6, 9, 10 or 15)."
            )
        self.strides, self.num_anchors, self.use_kps = _LAYOUTS[len(outputs)]
        if not self.use_kps:
            raise FaceError(
                f"{self.path}: this SCRFD model has no keypoint outputs; idcraft needs the 5 keypoints. Use "
                "a keypoint variant such as det_10g.onnx (buffalo_l) or scrfd_10g_bnkps.onnx (antelopev2)."
            )
        self.batched = len(outputs[0].shape) == 3
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}

    def detect(
        self,
        rgb: np.ndarray,
        input_size: tuple[int, int] = (640, 640),
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes with scores ``(N, 5)`` and keypoints ``(N, 5, 2)`` in pixels of ``rgb``, best score first."""
        size = self.fixed_input_size or input_size
        det_img, det_scale = letterbox(rgb, size)
        blob = ((det_img.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        net_outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        scores, boxes, kpss = self._decode(net_outs, blob.shape[2], blob.shape[3], threshold)
        if scores.size == 0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes /= det_scale
        kpss /= det_scale
        order = scores.argsort()[::-1]
        dets = np.hstack([boxes, scores[:, None]]).astype(np.float32)[order]
        kpss = kpss[order]
        keep = nms(dets, nms_threshold)
        return dets[keep], kpss[keep].astype(np.float32)

    def _decode(
        self, net_outs: list[np.ndarray], input_height: int, input_width: int, threshold: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = len(self.strides)
        all_scores, all_boxes, all_kps = [], [], []
        for index, stride in enumerate(self.strides):
            scores, box_d, kps_d = (net_outs[index + count * k] for k in range(3))
            if self.batched:
                scores, box_d, kps_d = scores[0], box_d[0], kps_d[0]
            height, width = input_height // stride, input_width // stride
            expected = height * width * self.num_anchors
            scores = np.asarray(scores, dtype=np.float32).reshape(-1)
            if scores.size != expected:
                raise FaceError(
                    f"{self.path}: stride-{stride} scores have {scores.size} values, expected {expected} "
                    f"for a {input_width}x{input_height} input; this does not look like an SCRFD detector."
                )
            key = (height, width, stride)
            if key not in self._centers:
                self._centers[key] = anchor_centers(height, width, stride, self.num_anchors)
            centers = self._centers[key]
            positive = np.where(scores >= threshold)[0]
            box_d = np.asarray(box_d, dtype=np.float32).reshape(expected, 4)[positive] * stride
            kps_d = np.asarray(kps_d, dtype=np.float32).reshape(expected, -1)[positive] * stride
            all_scores.append(scores[positive])
            all_boxes.append(distance2bbox(centers[positive], box_d))
            all_kps.append(distance2kps(centers[positive], kps_d))
        return (
            np.concatenate(all_scores),
            np.concatenate(all_boxes).astype(np.float32),
            np.concatenate(all_kps).astype(np.float32),
        )
