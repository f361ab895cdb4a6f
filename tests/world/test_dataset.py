"""Datasets: deterministic for a seed, readable by idcraft train's data reader without a skipped sample,
never containing a held-out identity, with complete ground truth; the CLI writes the same."""

from __future__ import annotations

import argparse
import json

import pytest

from idcraft.cli import world as world_cli
from idcraft.training.data import list_records
from idcraft.world import HELD_OUT_IDS, load_manifest, sample_for, write_dataset


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, write_dataset(root, 40, seed=3)


def test_manifest_reads_with_the_training_reader(dataset):
    root, manifest = dataset
    records, report = list_records(manifest)
    assert len(records) == 40 and not report.skipped and not report.empty_captions
    for record in records:
        assert record.reference and record.reference != record.image
        assert len(record.face["kps"]) == 5
    entries = load_manifest(root)
    assert [e["image"] for e in entries] == [r.image for r in records]
    for entry in entries:
        assert entry["identity_id"] not in HELD_OUT_IDS
        assert entry["reference"].endswith(f"id_{entry['identity_id']:04d}.png")
        for key in ("attributes", "scene", "kps", "bbox", "face_bbox", "reference_kps"):
            assert key in entry
        assert len(entry["attributes"]) == 11 and len(entry["bbox"]) == 4


def test_loss_masks_weight_the_character_and_its_face(dataset):
    """Background 1, character box 4, face box 7 (of 7 = 255): the mask's brightest pixels are the face's,
    and the training reader hands them over as weights."""
    import numpy as np
    from PIL import Image

    from idcraft.training.data import SampleLoader

    root, manifest = dataset
    records, _ = list_records(manifest)
    assert all(r.loss_mask for r in records)
    for entry in load_manifest(root)[:6]:
        mask = np.asarray(Image.open(root / "masks" / entry["image"].rsplit("/", 1)[-1]))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {36, 146, 255}
        x0, y0, x1, y1 = entry["face_bbox"]
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        assert mask[cy, cx] == 255 and mask[0, 0] == 36
        bx0, by0, bx1, by1 = entry["bbox"]
        assert (mask == 255).sum() < (mask >= 146).sum() <= (bx1 - bx0 + 1) * (by1 - by0 + 1)
    weights = SampleLoader(records[:1], 64, lambda im: {})[0]["loss_mask"]
    assert abs(weights.max().item() - 1.0) < 1e-6 and abs(weights.min().item() - 36 / 255) < 1e-6


def test_dataset_is_deterministic_and_prefix_stable(dataset, tmp_path):
    root, _ = dataset
    write_dataset(tmp_path / "again", 40, seed=3)
    assert _files(tmp_path / "again") == _files(root)
    write_dataset(tmp_path / "short", 5, seed=3)
    short, full = load_manifest(tmp_path / "short"), load_manifest(root)
    assert [e["text"] for e in short] == [e["text"] for e in full[:5]]
    assert sample_for(3, 4).caption == full[4]["text"]
    write_dataset(tmp_path / "other", 5, seed=4)
    assert [e["text"] for e in load_manifest(tmp_path / "other")] != [e["text"] for e in short]


def test_scene_references_and_unpaired(tmp_path):
    write_dataset(tmp_path / "scene", 6, seed=1, reference="scene")
    for entry in load_manifest(tmp_path / "scene"):
        assert entry["reference"].endswith(entry["image"].rsplit("/", 1)[-1])
        assert "/references/" in entry["reference"]
    write_dataset(tmp_path / "plain", 6, seed=1, paired=False)
    records, report = list_records(tmp_path / "plain" / "manifest.jsonl")
    assert len(records) == 6 and not report.skipped and all(r.reference is None for r in records)


def test_scene_only_captions_name_no_identity(tmp_path):
    from idcraft.world.captions import SHAPE_WORDS, caption
    from idcraft.world.dataset import scene_of
    from idcraft.world.identity import COLOURS

    write_dataset(tmp_path / "d", 8, seed=2, scene_only_captions=True)
    for entry in load_manifest(tmp_path / "d"):
        assert entry["text"] == caption(None, scene_of(entry))
        words = set(entry["text"].replace(",", "").split())
        assert not words & {*COLOURS, *SHAPE_WORDS.values()}, entry["text"]


def _cli(argv):
    parser = argparse.ArgumentParser()
    world_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_render_and_dataset(tmp_path, capsys):
    out = tmp_path / "one.png"
    argv = [
        "world",
        "render",
        "--id",
        "7",
        "--background",
        "night",
        "--position",
        "left",
        "--output",
        str(out),
    ]
    assert _cli(argv) == 0
    truth = json.loads(capsys.readouterr().out)
    assert out.is_file() and truth["identity_id"] == 7 and truth["scene"]["background"] == "night"
    assert "under a night sky" in truth["text"]
    assert (
        _cli(["world", "dataset", "--output", str(tmp_path / "ds"), "--samples", "4", "--split", "held-out"])
        == 0
    )
    assert all(e["identity_id"] in HELD_OUT_IDS for e in load_manifest(tmp_path / "ds"))
