"""The scores: ArcFace SimRef/SimGT through the insightface-pack backend, the copy-paste score (a copied
reference scores as a copy, the other photo as its opposite), CLIP-T, CLIP-I and DINO on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from idcraft.evaluation import Scorer, ScoringSettings, aggregate, copy_score

from .conftest import face_photo


def test_copy_score_is_the_normalised_angle_difference():
    cos = math.cos
    # out == ref: 1; out == gt: -1; halfway along the arc: 0
    assert copy_score(1.0, cos(0.6), cos(0.6)) == pytest.approx(1.0)
    assert copy_score(cos(0.6), 1.0, cos(0.6)) == pytest.approx(-1.0)
    assert copy_score(cos(0.3), cos(0.3), cos(0.6)) == pytest.approx(0.0)
    assert copy_score(cos(0.1), cos(0.5), cos(0.6)) == pytest.approx(0.4 / 0.6)
    assert copy_score(0.9, 0.9, 1.0) is None  # reference and ground truth are one picture


@pytest.fixture(scope="module")
def scorer(tiny_world):
    settings = ScoringSettings(
        face_models=str(tiny_world["pack"]),
        clip=str(tiny_world["clip"]),
        dino=str(tiny_world["dino"]),
        device="cpu",
    )
    return Scorer(settings)


def test_a_copied_reference_scores_as_copy_paste(scorer):
    reference, other_photo, stranger = face_photo(10), face_photo(11), face_photo(30)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 120, (64, 64, 3), dtype=np.uint8))
    subject = scorer.subject(reference, other_photo)
    assert subject.has_face and subject.face_gt is not None
    outputs = [reference.copy(), other_photo, stranger, noise]
    rows = scorer.score(outputs, ["a person"] * 4, [subject] * 4)
    copied, gt, new, nothing = rows
    assert copied["face"] and copied["sim_ref"] == pytest.approx(1.0, abs=1e-5)
    assert copied["copy"] == pytest.approx(1.0, abs=1e-3) and copied["copy_gap"] > 0
    assert gt["sim_gt"] == pytest.approx(1.0, abs=1e-5) and gt["copy"] == pytest.approx(-1.0, abs=1e-3)
    assert -1.0 <= new["copy"] < 0.5
    assert nothing["face"] is False and nothing["sim_ref"] is None and nothing["copy"] is None
    for row in rows:
        assert -1.0 <= row["clip_t"] <= 1.0 and -1.0 <= row["dino"] <= 1.0
    assert copied["clip_i"] == pytest.approx(1.0, abs=1e-5) and copied["dino"] == pytest.approx(1.0, abs=1e-5)
    summary = aggregate(rows, 0.5)
    assert summary["images"] == 4 and summary["face_rate"] == pytest.approx(0.75)
    assert summary["copy_rate"] == pytest.approx(1 / 3)  # of the three with a face, the pasted one


def test_subject_without_a_face_gets_character_scores_only(scorer):
    character = Image.fromarray(np.full((64, 64, 3), 40, np.uint8))
    subject = scorer.subject(character)
    assert not subject.has_face
    (row,) = scorer.score([character], ["a mascot"], [subject])
    assert row["face"] is None and row["sim_ref"] is None
    assert row["dino"] == pytest.approx(1.0, abs=1e-5)
    summary = aggregate([row])
    assert summary["face_rate"] is None and summary["dino"] == pytest.approx(1.0, abs=1e-5)
