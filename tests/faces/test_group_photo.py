"""Issue 28: the default backend finds every face of a side-by-side group photo.

Three people pasted side by side at 1504x800, faces about 90 and 160 px wide: the detector's first scan
(long side 640) shrinks the photo so far that the two smaller faces fall under its 64 px window; it used
to stop there with one face. A scan that shrank the image now goes on to the next size and merges.
"""

from __future__ import annotations

from PIL import Image, ImageOps


def _group(astronaut_path, hopper_path, height: int = 500) -> Image.Image:
    astronaut = Image.open(astronaut_path).convert("RGB")
    people = [astronaut, Image.open(hopper_path).convert("RGB"), ImageOps.mirror(astronaut)]
    canvas = Image.new("RGB", (1504, 800), (200, 200, 200))
    for i, person in enumerate(people):
        scaled = person.resize((round(person.width * height / person.height), height))
        canvas.paste(scaled, (501 * i + (500 - scaled.width) // 2, 800 - height - 50))
    return canvas


def test_every_face_of_a_side_by_side_group_photo_is_found(default_analyser, astronaut_path, hopper_path):
    faces = default_analyser.detect(_group(astronaut_path, hopper_path), embed=False)
    assert len(faces) == 3, [f.bbox.round() for f in faces]
    centres = sorted(float(f.bbox[0] + f.bbox[2]) / 2 for f in faces)
    assert centres[0] < 501 < centres[1] < 1002 < centres[2]  # one face in each third
    assert faces[0].bbox[2] - faces[0].bbox[0] > faces[-1].bbox[2] - faces[-1].bbox[0]  # largest first


def test_a_single_reference_still_takes_one_scan(default_analyser, astronaut_path, monkeypatch):
    scans = []
    boxes = default_analyser._boxes
    monkeypatch.setattr(default_analyser, "_boxes", lambda rgb, size: scans.append(size) or boxes(rgb, size))
    assert len(default_analyser.detect(astronaut_path, embed=False)) == 1
    assert scans == [640]  # the 256 px photo was enlarged and a face found: no second, costlier scan
