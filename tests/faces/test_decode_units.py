"""Pure-numpy pieces of the insightface-pack backend: anchor layout, NMS, execution-provider choice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from idcraft.faces.onnx_runtime import CPU, CUDA, ProviderWarning, resolve_providers
from idcraft.faces.scrfd import anchor_centers, distance2bbox, distance2kps, nms


def test_anchor_centres_are_cell_corners_with_anchors_consecutive():
    centers = anchor_centers(2, 3, 16, 2)
    assert centers.shape == (12, 2)
    np.testing.assert_array_equal(centers[:6], [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0]])
    np.testing.assert_array_equal(centers[6:8], [[0, 16], [0, 16]])


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = np.array(
        [
            [0, 0, 100, 100, 0.8],  # IoU ~0.82 with the better box 1: suppressed
            [5, 5, 105, 105, 0.9],  # best: kept
            [200, 200, 260, 260, 0.7],  # separate: kept
            [0, 0, 100, 60, 0.6],  # IoU ~0.49 with box 1: suppressed
        ],
        dtype=np.float32,
    )
    assert nms(dets, 0.4) == [1, 2]
    assert sorted(nms(dets, 0.9)) == [0, 1, 2, 3]


def test_distance_decoding():
    points = np.array([[100.0, 50.0]])
    np.testing.assert_allclose(
        distance2bbox(points, np.array([[10.0, 20.0, 30.0, 40.0]])), [[90, 30, 130, 90]]
    )
    offsets = np.arange(10, dtype=np.float64)[None]
    np.testing.assert_allclose(
        distance2kps(points, offsets)[0], [[100, 51], [102, 53], [104, 55], [106, 57], [108, 59]]
    )
    assert distance2kps(points[:0], offsets[:0]).shape == (0, 5, 2)


def test_provider_choice():
    assert resolve_providers(None, available=[CPU]) == [CPU]
    assert resolve_providers(None, available=[CUDA, CPU]) == [CUDA, CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the request can be honoured
        assert resolve_providers("cuda,cpu", available=[CUDA, CPU]) == [CUDA, CPU]
        assert resolve_providers(["CPUExecutionProvider"], available=[CUDA, CPU]) == [CPU]
    with pytest.warns(
        ProviderWarning, match=r"CUDAExecutionProvider requested but not available.*onnxruntime-gpu"
    ):
        assert resolve_providers(["cuda"], available=["AzureExecutionProvider", CPU]) == [CPU]
