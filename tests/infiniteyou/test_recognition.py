"""The official identity embedding: facexlib's IR-SE-50 ArcFace layout loads strictly from the user's file,
reads the BGR 112 px crop in [-1, 1], and gives a unit vector; missing or wrong weights are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcraft.errors import CheckpointError, IdcraftError
from idcraft.infiniteyou.recognition import (
    WEIGHTS_FILE,
    ArcFaceIRSE,
    embed_face,
    find_weights,
    load_recogniser,
)

KPS = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], np.float32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = ArcFaceIRSE().eval()
    folder = tmp_path_factory.mktemp("faces")
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    return folder


def test_embedding_is_unit_and_reads_bgr(weights):
    recogniser = load_recogniser(find_weights(weights))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # channel order matters: swapping R and B must change the embedding
    vector = embed_face(recogniser, rgb, KPS)
    assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    swapped = embed_face(recogniser, rgb[:, :, ::-1], KPS)
    assert np.abs(vector - swapped).max() > 1e-3


def test_missing_and_wrong_weights(tmp_path):
    with pytest.raises(IdcraftError, match=WEIGHTS_FILE):
        find_weights(tmp_path)
    bad = tmp_path / WEIGHTS_FILE
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="IR-SE-50"):
        load_recogniser(bad)
