"""Data: sidecar folders and JSONL manifests; bad samples are skipped and reported, never fatal; the
order is a function of (seed, epoch); the feature cache serves what the encoder would compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.errors import IdcraftError
from idcraft.training import train
from idcraft.training.data import (
    BatchStream,
    DataPosition,
    Record,
    SampleLoader,
    epoch_order,
    list_records,
    rank_stream,
    resize_and_crop,
)

from .helpers import config, make_images


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)


def test_folder_with_sidecars_missing_caption_and_corrupt_image(models, tmp_path):
    folder = tmp_path / "data"
    images = make_images(folder, 6)
    images[1].with_suffix(".txt").unlink()  # no caption: skipped and listed, as the README says
    images[5].with_suffix(".txt").write_text("  \n")  # an explicitly empty caption trains as one, counted
    _corrupt(images[3])  # skipped when loaded
    (folder / "notes.md").write_text("not an image")

    records, report = list_records(folder)
    assert [r.caption for r in records] == [
        "picture number 0",
        "picture number 2",
        "picture number 3",
        "picture number 4",
        "",
    ]
    assert report.skipped == {str(images[1]): "no caption: no img01.txt beside it"}
    assert report.empty_captions == [str(images[5])]

    result = train(config(models, folder, tmp_path / "run", max_steps=6))
    assert result.step == 6
    assert sorted(result.skipped.skipped) == [str(images[1]), str(images[3])]
    assert (
        "truncated or corrupt" in result.skipped.skipped[str(images[3])]
        or "not an image" in result.skipped.skipped[str(images[3])]
    )
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert listed[0] == f"skipped\t{images[1]}\tno caption: no img01.txt beside it"
    assert listed[1].startswith(f"skipped\t{images[3]}\t")
    assert listed[2] == f"empty-caption\t{images[5]}\ttrained with an empty caption"


def test_jsonl_manifest_with_references_and_bad_lines(models, tmp_path):
    images = make_images(tmp_path / "imgs", 5)
    _corrupt(images[4])
    lines = [
        {"image": "imgs/img00.png", "text": "first"},
        {"image": str(images[1]), "text": "second", "reference": "imgs/img02.png"},  # reference != target
        {"image": "imgs/img02.png"},  # no caption: skipped and listed
        {"image": "imgs/img02.png", "text": ""},  # an explicitly empty caption: trains, counted
        {"image": "imgs/missing.png", "text": "gone"},
        {"image": "imgs/img03.png", "text": "no ref", "reference": "imgs/nope.png"},
        {"image": "imgs/img03.png", "text": "fine"},
        {"image": "imgs/img04.png", "text": "corrupt"},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken json\n\n")

    records, report = list_records(manifest)
    assert [r.caption for r in records] == ["first", "second", "", "fine", "corrupt"]
    assert report.empty_captions == [f"{manifest}:4"]
    assert (
        records[1].reference == str(tmp_path / "imgs" / "img02.png")
        and records[1].reference_path != records[1].image
    )
    assert records[0].reference is None and records[0].reference_path == records[0].image
    reasons = report.skipped
    assert set(reasons) == {f"{manifest}:3", f"{manifest}:5", f"{manifest}:6", f"{manifest}:9"}
    assert "no caption" in reasons[f"{manifest}:3"]
    assert "no such file" in reasons[f"{manifest}:5"] and "reference" in reasons[f"{manifest}:6"]
    assert "JSON" in reasons[f"{manifest}:9"]

    result = train(config(models, manifest, tmp_path / "run", max_steps=4))
    assert result.step == 4
    assert set(result.skipped.skipped) == {
        f"{manifest}:3",
        f"{manifest}:5",
        f"{manifest}:6",
        f"{manifest}:9",
        str(images[4]),
    }
    assert (
        len((tmp_path / "run" / "skipped.txt").read_text().splitlines()) == 6
    )  # 5 skipped + 1 empty caption


def test_loss_masks_are_read_cropped_like_their_images_and_checked(models, tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    width, height = Image.open(images[0]).size  # 40 x 56: the crop cuts rows
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2] = 255  # the top half
    Image.fromarray(mask).save(tmp_path / "mask0.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.png")
    lines = [
        {"image": "imgs/img00.png", "text": "masked", "loss_mask": "mask0.png"},
        {"image": "imgs/img01.png", "text": "unmasked"},
        {"image": "imgs/img02.png", "text": "no mask file", "loss_mask": "gone.png"},
        {"image": "imgs/img02.png", "text": "wrong size", "loss_mask": "small.png"},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, report = list_records(manifest)
    assert [r.caption for r in records] == ["masked", "unmasked", "wrong size"]
    assert "loss_mask" in report.skipped[f"{manifest}:3"]

    loader = SampleLoader(records, 32, lambda im: {})
    masked = loader[0]["loss_mask"]
    expected, _ = resize_and_crop(Image.fromarray(mask), 32)
    assert masked.shape == (1, 32, 32)
    assert torch.allclose(masked[0], torch.from_numpy(np.asarray(expected, np.float32) / 255))
    assert 0 < masked.mean() < 1
    assert torch.equal(loader[1]["loss_mask"], torch.ones(1, 32, 32))  # batches still stack
    assert "8x8" in loader[2]["error"] and "draw the mask" in loader[2]["error"]
    assert "loss_mask" not in SampleLoader(records[1:2], 32, lambda im: {})[0]

    result = train(config(models, manifest, tmp_path / "run", max_steps=2))
    assert result.step == 2 and str(records[2].image) in result.skipped.skipped


def test_reference_is_encoded_and_image_is_the_target(models, tmp_path):
    images = make_images(tmp_path, 2)
    calls = []
    loader = SampleLoader(
        [Record(str(images[0]), "x", str(images[1]))],
        32,
        lambda im: calls.append(im.size) or {"ref": torch.zeros(1)},
    )
    item = loader[0]
    assert calls == [Image.open(images[1]).size]  # the reference went to the encoder input
    assert item["original_size"].tolist() == [Image.open(images[0]).height, Image.open(images[0]).width]
    assert item["pixels"].shape == (3, 32, 32) and -1 <= item["pixels"].min() and item["pixels"].max() <= 1


def test_nothing_usable_is_a_clear_error(models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdcraftError, match="no usable samples"):
        train(config(models, tmp_path / "empty", tmp_path / "run", max_steps=1))
    with pytest.raises(IdcraftError, match="no such folder"):
        train(config(models, tmp_path / "nowhere", tmp_path / "run", max_steps=1))


def test_feature_cache_matches_the_encoder_and_is_reused(models, tmp_path):
    folder = tmp_path / "data"
    make_images(folder, 4)
    cache = tmp_path / "cache"
    common = dict(method="ip-adapter-full-face", max_steps=3, seed=2)
    plain = train(config(models, folder, tmp_path / "plain", **common))
    cached = train(
        config(models, folder, tmp_path / "cached", cache_features=True, cache_dir=str(cache), **common)
    )
    shards = sorted(cache.glob("features-*.safetensors"))
    assert len(shards) == 1 and (cache / "meta.json").is_file()
    # The same features (computed in another batch composition): the same training up to float rounding.
    assert np.allclose(cached.losses, plain.losses, rtol=1e-4), (cached.losses, plain.losses)

    stamp = shards[0].stat().st_mtime_ns
    again = train(
        config(models, folder, tmp_path / "again", cache_features=True, cache_dir=str(cache), **common)
    )
    assert shards[0].stat().st_mtime_ns == stamp  # reused, not recomputed
    assert again.losses == cached.losses


def test_feature_cache_leaves_unreadable_references_out(tmp_path):
    from idcraft.training.cache import FeatureCache
    from idcraft.training.data import SkipReport

    images = make_images(tmp_path / "imgs", 3)
    _corrupt(images[1])
    records = [Record(str(p), "c") for p in images]
    cache = FeatureCache(tmp_path / "cache", {"encoder": "test"}, chunk_size=2)
    cache.prepare(is_main=True)
    encoded = []

    def encode(inputs):
        encoded.append(len(inputs["x"]))
        return inputs["x"] * 2

    cache.build(records, lambda im: {"x": torch.tensor([float(im.width)])}, encode, batch_size=8)
    assert encoded == [1, 1]  # two chunks; the corrupt reference never reached the encoder
    report = SkipReport()
    kept, lookup = cache.load(records, report)
    assert kept == [records[0], records[2]] and list(report.skipped) == [str(images[1])]
    assert lookup(records[2]).item() == 2 * Image.open(images[2]).width
    FeatureCache(tmp_path / "cache", {"encoder": "other"}).prepare(is_main=True)  # another encoder: emptied
    assert not list((tmp_path / "cache").glob("features-*"))


def test_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(10, 7, 0), epoch_order(10, 7, 0)
    assert np.array_equal(a, b) and sorted(a) == list(range(10))
    assert not np.array_equal(a, epoch_order(10, 7, 1)) and not np.array_equal(a, epoch_order(10, 8, 0))
    shares = [rank_stream(10, 7, 3, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(10))


def test_stream_position_resumes_exactly(tmp_path):
    images = make_images(tmp_path, 7)
    _corrupt(images[5])
    records = [Record(str(p), f"c{i}") for i, p in enumerate(images)]
    loader = SampleLoader(records, 32, lambda im: {})

    def run(stream, position, count):
        out = []
        while len(out) < count:
            for batch in stream.epoch(position):
                out.append(batch["index"])
                if len(out) == count:
                    break
        return out

    whole = run(BatchStream(loader, batch_size=2, seed=0, rank=0, world=1), DataPosition(), 9)
    position = DataPosition()
    first = run(BatchStream(loader, batch_size=2, seed=0, rank=0, world=1), position, 4)
    saved = DataPosition(position.epoch, position.step, position.cursor)
    rest = run(BatchStream(loader, batch_size=2, seed=0, rank=0, world=1), saved, 5)
    assert first + rest == whole
    assert all(5 not in batch for batch in whole)  # the corrupt one never reaches a batch
    assert all(len(batch) == 2 for batch in whole)


def test_resize_and_crop_keeps_the_official_geometry():
    image = Image.new("RGB", (200, 100))
    crop, (top, left) = resize_and_crop(image, 64)
    assert crop.size == (64, 64) and (top, left) == (0, 32)
    crop, (top, left) = resize_and_crop(Image.new("RGB", (50, 120)), 32)
    assert crop.size == (32, 32) and (top, left) == ((76 - 32) // 2, 0)


def test_worker_processes_load_the_same_batches(models, tmp_path):
    folder = tmp_path / "data"
    images = make_images(folder, 5)
    _corrupt(images[0])
    inline = train(config(models, folder, tmp_path / "inline", max_steps=3, seed=6))
    workers = train(config(models, folder, tmp_path / "workers", max_steps=3, seed=6, num_workers=2))
    assert workers.losses == inline.losses
    assert list(workers.skipped.skipped) == [str(images[0])]
