"""PuLID's image chain: 512 alignment, parsing -> white/grey, resize as torchvision 0.15.2, label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idcraft.errors import IdcraftError
from idcraft.pulid import preprocess


def test_whitened_labels_white_rest_grey():
    face = torch.rand(1, 3, 4, 4)
    labels = torch.tensor([[0, 1, 16, 17], [18, 7, 8, 9], [14, 15, 2, 10], [11, 12, 13, 4]])[None, None]
    out = preprocess.face_features_image(face, labels)
    white = torch.isin(labels, torch.tensor(preprocess.WHITENED_LABELS))[0, 0]
    assert torch.all(out[0, :, white] == 1)
    gray = 0.299 * face[0, 0] + 0.587 * face[0, 1] + 0.114 * face[0, 2]
    for c in range(3):
        assert torch.allclose(out[0, c][~white], gray[~white])


def test_resize_is_plain_bicubic_without_antialias():
    x = torch.rand(1, 3, 512, 512)
    expected = F.interpolate(x, size=(336, 336), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(preprocess.resize_bicubic(x, 336), expected)
    assert preprocess.resize_bicubic(torch.rand(1, 3, 300, 600), 56).shape[-2:] == (56, 112)
    normalised = preprocess.eva_input(torch.ones(1, 3, 8, 8), 8)
    mean, std = torch.tensor(preprocess.OPENAI_CLIP_MEAN), torch.tensor(preprocess.OPENAI_CLIP_STD)
    assert torch.allclose(normalised[0, :, 0, 0], (1 - mean) / std)


def test_alignment_puts_keypoints_on_the_ffhq_template():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
    # keypoints = the template scaled by 0.5 and shifted: the warp must undo exactly that
    kps = preprocess.FFHQ_TEMPLATE_512 * 0.5 + np.array([40.0, 20.0])
    aligned = preprocess.align_face(image, kps)
    assert aligned.shape == (512, 512, 3)
    x, y = 300, 260  # an aligned pixel comes from the photo at (x, y) * 0.5 + shift
    np.testing.assert_allclose(aligned[y, x], image[int(y * 0.5 + 20), int(x * 0.5 + 40)], atol=1)


def test_label_maps_and_aligned_faces_are_checked(tmp_path):
    labels = np.zeros((512, 512), np.uint8)
    labels[100:200] = 17
    Image.fromarray(labels).save(tmp_path / "labels.png")
    assert np.array_equal(preprocess.read_label_map(tmp_path / "labels.png"), labels)
    with pytest.raises(IdcraftError, match="512x512 map of CelebAMask-HQ labels"):
        preprocess.read_label_map(np.full((512, 512), 40, np.uint8))
    with pytest.raises(IdcraftError, match="512x512"):
        preprocess.check_aligned(np.zeros((256, 256, 3), np.uint8))
