"""Hardening (issue 21): every bad input a clear error, no output ever lost, no size unbounded.

Atomic user outputs (:mod:`idcraft.outputs`), ``idcraft faces --save-embeddings`` names and overwrites,
bounds and honest messages for bad files and folders, ``idcraft --version`` and help for every flag, and
the world face backend refusing images that are not of its world. Training run folders (locks, finished
runs, resume checks) are tested in ``tests/training/test_run_folder.py`` beside their tiny models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcraft.errors import CheckpointError, ModelLoadError, OutputError
from idcraft.outputs import (
    atomic_save_image,
    atomic_save_npy,
    atomic_write_bytes,
    check_output_path,
    check_output_paths,
    numbered_paths,
)

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"


def _picture(mode: str = "RGB", size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(0)
    channels = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------- atomic outputs
@pytest.mark.parametrize(
    "name, expected", [("o.png", "PNG"), ("o.jpg", "JPEG"), ("o.JPEG", "JPEG"), ("o.webp", "WEBP")]
)
def test_the_extension_chooses_the_image_format(tmp_path, name, expected):
    path = atomic_save_image(_picture("RGBA"), tmp_path / name)
    assert path == tmp_path / name and path.is_file()
    assert Image.open(path).format == expected
    assert _leftovers(tmp_path, {name}) == []  # no o.jpg.png, no temporary file


def test_jpeg_is_rgb_at_quality_95(tmp_path):
    atomic_save_image(_picture("RGBA", (64, 64)), tmp_path / "o.jpg")
    written = Image.open(tmp_path / "o.jpg")
    assert written.mode == "RGB"
    # quality 95 scales the standard luminance table (largest step 121) to a tenth; Pillow's default 75
    # would halve it
    assert max(written.quantization[0]) <= 13


@pytest.mark.parametrize("name", ["o.gif", "o.txt", "o", "o.png.bak"])
def test_unknown_extension_is_a_clear_error(tmp_path, name):
    with pytest.raises(OutputError, match=r"\.png, \.jpg, \.jpeg, \.webp"):
        atomic_save_image(_picture(), tmp_path / name)
    with pytest.raises(OutputError, match=r"\.png"):
        check_output_path(tmp_path / name, image=True)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "o.png"
    path.write_bytes(b"precious")
    with pytest.raises(OutputError, match="--overwrite"):
        atomic_save_image(_picture(), path)
    assert path.read_bytes() == b"precious"
    array_file = tmp_path / "o.npy"
    array_file.write_bytes(b"also precious")
    with pytest.raises(OutputError, match="--overwrite"):
        atomic_save_npy(np.zeros(3), array_file)
    assert array_file.read_bytes() == b"also precious"
    atomic_save_image(_picture(), path, overwrite=True)
    assert Image.open(path).format == "PNG"


def test_failed_image_encode_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "o.png"
    path.write_bytes(b"the previous image")

    def broken_save(self, fp, *args, **kwargs):  # the encoder dies half way through
        fp.write(b"\x89PNG half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises((OutputError, OSError)):
        atomic_save_image(_picture(), path, overwrite=True)
    assert path.read_bytes() == b"the previous image"
    assert _leftovers(tmp_path, {"o.png"}) == []

    fresh = tmp_path / "new.jpg"
    with pytest.raises((OutputError, OSError)):
        atomic_save_image(_picture(), fresh)
    assert not fresh.exists() and _leftovers(tmp_path, {"o.png"}) == []


def test_failed_npy_and_bytes_writes_leave_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "e.npy"
    atomic_save_npy(np.arange(4.0), path)
    before = path.read_bytes()

    def broken(file, array, **kwargs):
        file.write(b"\x93NUMPY")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(RuntimeError):
        atomic_save_npy(np.ones(4), path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and np.array_equal(np.load(path), np.arange(4.0))
    assert _leftovers(tmp_path, {"e.npy"}) == []

    target = tmp_path / "deep" / "er" / "b.bin"
    atomic_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc"


def test_check_output_path_refuses_before_any_work(tmp_path, monkeypatch):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        check_output_path(existing)
    assert check_output_path(existing, overwrite=True) == existing
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path, overwrite=True)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create folder"):
        check_output_path(blocker / "sub" / "o.png")
    # a folder that cannot be written (simulated: this test may run as root, which ignores mode bits)
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(OutputError, match="not writable"):
        check_output_path(tmp_path / "ro" / "o.png")
    monkeypatch.undo()
    made = check_output_path(tmp_path / "new" / "folder" / "o.png", image=True)
    assert made == tmp_path / "new" / "folder" / "o.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken.png"]  # nothing left behind


def test_numbered_paths_keep_the_extension(tmp_path):
    assert numbered_paths("out/o.jpg", 1) == [Path("out/o.jpg")]
    assert numbered_paths("out/o.jpg", 3) == [Path("out/o-0.jpg"), Path("out/o-1.jpg"), Path("out/o-2.jpg")]
    (tmp_path / "o-1.webp").write_bytes(b"x")
    with pytest.raises(OutputError, match="o-1.webp"):
        check_output_paths(tmp_path / "o.webp", 2)
    assert len(check_output_paths(tmp_path / "o.webp", 2, overwrite=True)) == 2


# ---------------------------------------------------------------------------- idcraft faces
def _world_photos(tmp_path: Path, names: list[str]) -> list[Path]:
    from idcraft.world import identity_from_id, render_reference

    paths = []
    for i, name in enumerate(names):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        render_reference(identity_from_id(10 + 7 * i)).image.save(path)
        paths.append(path)
    return paths


def test_faces_save_embeddings_never_overwrites(tmp_path, capsys, monkeypatch):
    from idcraft.cli import main
    from idcraft.faces import get_face_analyser

    photos = _world_photos(tmp_path, ["a/photo.png", "b/photo.png", "c/photo-2.png", "d/PHOTO.png"])
    out = tmp_path / "emb"
    argv = ["faces", "--backend", "world", "--save-embeddings", str(out), *map(str, photos)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{s}.{e}" for s in ("photo", "photo-2", "photo-2-2", "PHOTO-3") for e in ("npy", "json")
    )
    assert str(photos[1]) in err and "photo-2" in err  # the renaming is said
    analyser = get_face_analyser("world")
    for stem, photo in zip(("photo", "photo-2", "photo-2-2", "PHOTO-3"), photos, strict=True):
        assert json.loads((out / f"{stem}.json").read_text())["image"] == str(photo)
        (face,) = analyser.detect(Image.open(photo))
        np.testing.assert_allclose(np.load(out / f"{stem}.npy"), face.embedding, rtol=1e-5, atol=1e-5)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # a second run refuses, before the analyser is even built, and leaves the files alone
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_models(*args, **kwargs):
        raise AssertionError("the analyser was built before the outputs were checked")

    monkeypatch.setattr("idcraft.faces.get_face_analyser", no_models)
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert main([*argv, "--overwrite"]) == 0


# ---------------------------------------------------------------------------- bounds and messages
@pytest.mark.parametrize("resolution", ["0", "-64", "100000"])
def test_world_render_resolution_is_bounded(tmp_path, capsys, monkeypatch, resolution):
    import idcraft.world
    from idcraft.cli import main

    def never(*args, **kwargs):
        raise AssertionError("rendered before checking the resolution")

    monkeypatch.setattr(idcraft.world, "render", never)
    monkeypatch.setattr(idcraft.world, "render_reference", never)
    out = tmp_path / "r.png"
    assert main(["world", "render", "--id", "3", "--resolution", resolution, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resolution" in err and "16 to 2048" in err and "Traceback" not in err
    assert not out.exists()


def test_world_render_writes_the_format_asked_for_and_keeps_files(tmp_path, capsys):
    from idcraft.cli import main

    out = tmp_path / "r.jpg"
    assert main(["world", "render", "--id", "3", "--output", str(out)]) == 0
    assert Image.open(out).format == "JPEG" and sorted(p.name for p in tmp_path.iterdir()) == ["r.jpg"]
    first = out.read_bytes()
    assert main(["world", "render", "--id", "4", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["world", "render", "--id", "4", "--output", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != first


def test_random_bytes_bin_is_not_a_checkpoint(tmp_path):
    from idcraft.checkpoints import load_checkpoint

    path = tmp_path / "adapter.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "not a PyTorch checkpoint" in message and "corrupt or truncated" in message
    assert "Python objects" not in message


def test_base_folder_without_unet_says_so(tmp_path):
    from idcraft.models import base_kind, load_base_pipeline

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
    }
    partial = tmp_path / "partial"
    (partial / "vae").mkdir(parents=True)
    (partial / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError, match=r"no unet/ subfolder.*not a complete diffusers Stable Diffusion"
    ):
        base_kind(partial)
    bare = tmp_path / "bare"
    (bare / "text_encoder").mkdir(parents=True)
    import torch

    with pytest.raises(
        ModelLoadError, match=r"no unet/ subfolder.*not a diffusers Stable Diffusion pipeline"
    ):
        load_base_pipeline(bare, device=torch.device("cpu"), dtype=torch.float32)


def test_text_encoder_given_as_image_encoder_says_so(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from idcraft.models import load_image_encoder

    config = CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    )
    CLIPTextModel(config).save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(ModelLoadError) as caught:
        load_image_encoder(tmp_path / "text_encoder")
    message = str(caught.value)
    assert "text encoder" in message and "not a CLIP vision model" in message
    assert "above report" not in message


# ---------------------------------------------------------------------------- the command line itself
def test_version(capsys):
    import idcraft
    from idcraft.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"idcraft {idcraft.__version__}"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from idcraft.cli import build_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")

    walk(build_parser(), "idcraft")
    return found


@pytest.mark.parametrize("command", sorted(_parsers()))
def test_every_flag_has_help(command):
    parser = _parsers()[command]
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction)
        and (a.help is None or (a.help != argparse.SUPPRESS and not str(a.help).strip()))
    ]
    assert not missing, f"{command}: no help text for {missing}"


@pytest.mark.parametrize("argv", [["--version"], ["faces", "--help"], ["world", "render", "--help"]])
def test_quick_commands_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from idcraft.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "HEAVY []" in done.stderr, done.stderr[-2000:]


# ---------------------------------------------------------------------------- the world face backend
@pytest.fixture(scope="module")
def world_analyser():
    from idcraft.faces import get_face_analyser

    return get_face_analyser("world")


def _not_the_world() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    return {
        "astronaut photo": astronaut,
        "astronaut, centre crop": astronaut.crop((100, 40, 420, 360)),
        "noise": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "smooth noise": Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize(
            (64, 64), Image.BILINEAR
        ),
        "flat colour": Image.new("RGB", (200, 150), (120, 80, 40)),
        "gradient": Image.linear_gradient("L").convert("RGB"),
    }


@pytest.mark.parametrize("name", sorted(_not_the_world()))
def test_world_backend_finds_no_face_outside_its_world(world_analyser, name):
    from idcraft.faces import NoFaceError, analyse_reference

    image = _not_the_world()[name]
    assert world_analyser.detect(image) == []
    with pytest.raises(NoFaceError, match="world"):
        analyse_reference(image, world_analyser)


def test_world_backend_still_finds_every_world_character(world_analyser):
    from idcraft.world import NUM_IDENTITIES, identity_from_id, random_scene, render, render_reference

    rng = np.random.default_rng(21)
    scenes = [
        np.asarray(
            render(identity_from_id(int(rng.integers(NUM_IDENTITIES))), random_scene(rng), 64, rng).image
        )
        for _ in range(96)
    ]
    references = [
        np.asarray(render_reference(identity_from_id(i)).image) for i in range(0, NUM_IDENTITIES, 30)
    ]
    found = world_analyser.detect_batch(np.stack(scenes + references))
    assert world_analyser.accepted(found).all(), found["familiarity"].max()
    assert found["familiarity"].max() < 0.85 * world_analyser.familiarity_threshold  # with room to spare
    big = render(identity_from_id(5), random_scene(rng), 256, rng).image  # other sizes resize to 64
    assert len(world_analyser.detect(big)) == 1


def test_demo_output_that_is_a_file_fails_before_any_model_loads(tmp_path, capsys):
    from idcraft.cli import main

    target = tmp_path / "grid"
    target.write_text("keep me")
    assert main(["demo", "--output", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "99999"], "ports run from 0 to 65535"),
        (["eval", "--ids", "1", "--output", "{file}"], "is a file"),
    ],
)
def test_more_everyday_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    from idcraft.cli import main

    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main([a.format(file=target) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert target.read_text() == "keep me"
