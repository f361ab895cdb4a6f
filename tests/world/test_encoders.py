"""The world's two image encoders, trained tiny: the CLIP role (contrastive, loads as a real CLIP vision
folder) and the face-analysis role (detector + ArcFace-style recogniser behind the "world" backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.faces import ARCFACE, NoFaceError, analyse_reference, get_face_analyser, similarity_transform
from idcraft.faces.types import FaceError
from idcraft.world import face_backend, held_out_ids, train_ids
from idcraft.world.arrays import attribute_labels, empty_scenes, render_arrays
from idcraft.world.face_backend import WorldFaceAnalyser, crop_template, similarity_matrices, warp_crops
from idcraft.world.trainers.clip_vision import clip_pixels, train_clip_vision
from idcraft.world.trainers.identity import train_identity

TINY_CLIP = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "projection_dim": 24,
    "text_hidden_size": 32,
    "text_num_hidden_layers": 1,
    "text_num_attention_heads": 2,
    "text_intermediate_size": 64,
    "warmup_steps": 5,
    "group_size": 4,
}
TINY_FACE = {
    "detector_widths": [8, 12, 16, 24],
    "recogniser_widths": [8, 12, 16, 24],
    "crop_width": 14,
    "crop_height": 20,
}
#: One training identity per coarse class: a small problem a tiny model learns in a few steps.
FEW_IDS = train_ids()[::18][:48]


@pytest.fixture(scope="module")
def train_arrays():
    return render_arrays(384, seed=5, ids=FEW_IDS, workers=1)


@pytest.fixture(scope="module")
def eval_arrays():
    return render_arrays(96, seed=6, ids=held_out_ids(), workers=1)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, train_arrays, eval_arrays):
    out = tmp_path_factory.mktemp("clip")
    result = train_clip_vision(
        train_arrays.subset(slice(0, 64)),
        out,
        steps=30,
        batch_size=16,
        learning_rate=3e-3,
        config=TINY_CLIP,
        progress=False,
        eval_arrays=eval_arrays.subset(slice(0, 32)),
    )
    return out, result


@pytest.fixture(scope="module")
def face_run(tmp_path_factory, train_arrays, eval_arrays):
    out = tmp_path_factory.mktemp("bundle") / "identity"
    result = train_identity(
        train_arrays,
        out,
        steps=80,
        batch_size=32,
        learning_rate=1e-2,
        config=TINY_FACE,
        progress=False,
        eval_arrays=eval_arrays,
    )
    return out, result


def test_clip_pixels_are_the_default_processors(train_arrays):
    from idcraft.encoders.clip import default_image_processor

    images = train_arrays.images[:6]
    expected = default_image_processor()(images=[Image.fromarray(i) for i in images], return_tensors="pt")
    ours = clip_pixels(torch.from_numpy(images))
    assert ours.shape == expected.pixel_values.shape == (6, 3, 224, 224)
    # PIL resamples in fixed point: a level or two of difference on a few pixels, never more
    assert (ours - expected.pixel_values).abs().max() < 3 / 255 / 0.26
    assert (ours - expected.pixel_values).abs().mean() < 1e-3


def test_clip_vision_learns_and_loads_as_a_clip_image_encoder(clip_run, train_arrays):
    from idcraft.encoders.clip import ClipImageEncoder
    from idcraft.models import load_image_encoder

    out, result = clip_run
    assert result["final_loss"] < result["initial_loss"] - 0.5  # it learned to pair renders with captions
    assert 0.0 <= result["image_to_caption_content_top1"] <= 1.0 and result["eval_samples"] == 32
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    model = load_image_encoder(out)
    assert type(model).__name__ == "CLIPVisionModelWithProjection"
    assert model.config.image_size == 224 and model.config.patch_size == 28
    encoder = ClipImageEncoder.from_pretrained(out)
    images = [Image.fromarray(i) for i in train_arrays.images[:3]]
    pooled, _ = encoder.encode(images, "pooled", "zero-embeds")
    tokens, _ = encoder.encode(images, "penultimate", "zero-image")
    assert pooled.shape == (3, TINY_CLIP["projection_dim"])
    assert tokens.shape == (3, 65, TINY_CLIP["hidden_size"])  # 8x8 patches + class token
    with torch.no_grad():  # the torch preprocessing the encoder was trained on gives the same features
        direct = model(clip_pixels(torch.from_numpy(train_arrays.images[:3]))).image_embeds
    assert torch.allclose(direct, pooled, atol=0.05 * float(pooled.abs().max()))


def test_identity_models_learn_and_identify_held_out_characters(face_run):
    _, result = face_run
    assert result["recogniser_train_accuracy"] > 0.2
    assert result["detector_final_train_kps_px"] < 0.5 * result["detector_initial_kps_px"]
    chance = result["identification_chance"]
    assert result["identification_ids"] == 96 and chance == pytest.approx(1 / 96)
    assert result["gt_kps_top1"] > 5 * chance  # ids never seen in training, against their references
    assert result["analyser_top1"] > 3 * chance  # through detector -> align -> recogniser
    assert result["detector_kps_error_px"] < 6.0


def test_world_analyser_returns_arcface_role_faces(face_run, eval_arrays):
    out, _ = face_run
    analyser = get_face_analyser("world", models_dir=out)
    assert isinstance(analyser, WorldFaceAnalyser) and analyser.embedding_kind == ARCFACE
    assert isinstance(get_face_analyser("world", models_dir=out.parent), WorldFaceAnalyser)  # bundle root
    image = eval_arrays.images[0]
    (face,) = analyser.detect(image)
    assert face.bbox.shape == (4,) and face.kps.shape == (5, 2) and face.backend == "world"
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert face.is_arcface and face.embedding_model == face_backend.EMBEDDING_MODEL
    assert analyser.detect(image, embed=False)[0].embedding is None
    # any size: detected at 64x64, coordinates given back in the image's own pixels
    large = Image.fromarray(image).resize((128, 96), Image.NEAREST)
    (big,) = analyser.detect(large)
    small = analyser.detect_batch(np.asarray(large.resize((64, 64), Image.LANCZOS))[None])
    scale = np.array([2.0, 1.5], dtype=np.float32)
    np.testing.assert_allclose(big.kps, (small["kps"][0] + 0.5) * scale - 0.5, atol=1e-4)
    np.testing.assert_allclose(big.bbox, small["bbox"][0] * np.tile(scale, 2), atol=1e-4)
    assert np.abs(small["kps"][0] - face.kps).max() < 3.0  # and the same character was found
    # a scene with no character: no face, and the same NoFaceError as the real backends
    blank = empty_scenes(1, seed=11)[0]
    assert analyser.detect(blank) == []
    with pytest.raises(NoFaceError, match="world detector"):
        analyse_reference(blank, analyser)


def test_world_backend_errors(tmp_path):
    with pytest.raises(FaceError, match="no world face models"):
        get_face_analyser("world", models_dir=tmp_path)
    with pytest.raises(FaceError, match="providers"):
        get_face_analyser("world", models_dir=tmp_path, providers="cpu")


def test_alignment_is_arcfaces_similarity_warp(train_arrays):
    cv2 = pytest.importorskip("cv2")
    template = crop_template(face_backend.DEFAULT_CONFIG)
    kps = train_arrays.kps[:4]
    matrices = similarity_matrices(torch.from_numpy(kps), torch.from_numpy(template))
    for k, m in zip(kps, matrices, strict=True):
        np.testing.assert_allclose(m.numpy(), similarity_transform(k, template), atol=1e-4)
    w, h = face_backend.DEFAULT_CONFIG["crop_width"], face_backend.DEFAULT_CONFIG["crop_height"]
    images = torch.from_numpy(train_arrays.images[:4]).permute(0, 3, 1, 2).float()
    crops = warp_crops(images, matrices, w, h).permute(0, 2, 3, 1).numpy()
    for image, m, crop in zip(train_arrays.images[:4], matrices, crops, strict=True):
        expected = cv2.warpAffine(image.astype(np.float32), m.numpy().astype(np.float64), (w, h))
        np.testing.assert_allclose(crop, expected, atol=0.01)


def test_identity_training_refuses_held_out_ids(tmp_path):
    arrays = render_arrays(2, seed=0, ids=held_out_ids()[:2], workers=1)
    with pytest.raises(ValueError, match="held-out"):
        train_identity(arrays, tmp_path, steps=1, batch_size=2, progress=False)


def test_identity_training_learns_the_crowd_beside_the_training_ids(tmp_path):
    """Crowd ids (beyond the world table) render and train like table ids: their references are drawn
    and each becomes a class of the ArcFace head."""
    from idcraft.world.identity import crowd_ids, resolve_identity

    ids = (*FEW_IDS[:4], *crowd_ids(4))
    arrays = render_arrays(16, seed=3, ids=ids, workers=1)
    assert set(arrays.identity_ids) <= set(ids) and max(arrays.identity_ids) >= crowd_ids(1)[0]
    crowd_row = int(np.argmax(arrays.identity_ids >= crowd_ids(1)[0]))
    expected = attribute_labels(resolve_identity(int(arrays.identity_ids[crowd_row])).attributes())
    assert arrays.attributes[crowd_row].tolist() == expected
    held_out = render_arrays(8, seed=4, ids=held_out_ids()[:4], workers=1)
    result = train_identity(
        arrays, tmp_path, steps=1, batch_size=8, config=TINY_FACE, progress=False, eval_arrays=held_out
    )
    assert result["train_identities"] == len(set(arrays.identity_ids.tolist()))
