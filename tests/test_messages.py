"""Issue 28: messages that misled now say what happened -- a URL as a reference, a text file as a face
embedding, a missing local model folder, a face error without the file's name, ``--multi-person`` on a
group photo the world's one-character detector cannot split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcraft.errors import IdcraftError, ImageError, ModelLoadError
from idcraft.faces import NoFaceError

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"


@pytest.mark.parametrize("url", ["https://example.com/face.jpg", "http://x/y.png", "HTTPS://A/B"])
def test_a_url_as_reference_says_urls_are_not_fetched(url):
    from idcraft.images import load_image

    with pytest.raises(ImageError, match="URLs are not fetched: download the image first"):
        load_image(url)


def test_a_url_reference_on_the_command_line(tmp_path, capsys):
    from idcraft.cli import main

    world = Path(__file__).parents[1] / "src" / "idcraft" / "world" / "bundle"
    argv = [
        "generate", "--base", str(world / "sd"), "--adapter", str(world / "adapters" / "ip-adapter_world.safetensors"),
        "--reference", "https://example.com/me.jpg", "--prompt", "p", "--output", str(tmp_path / "o.png"),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "URLs are not fetched" in err and "no such file" not in err and "Traceback" not in err


def test_face_embedding_files_are_read_by_their_bytes(tmp_path):
    from safetensors.numpy import save_file

    from idcraft.inputs import load_embedding

    vector = np.arange(512, dtype=np.float32)
    np.save(tmp_path / "e.npy", vector)
    np.savez(tmp_path / "e.npz", embedding=vector)
    save_file({"embedding": vector}, str(tmp_path / "e.safetensors"))
    for name in ("e.npy", "e.npz", "e.safetensors"):
        assert np.array_equal(load_embedding(str(tmp_path / name)), vector), name
    (tmp_path / "e.txt").write_text("0.1, 0.2, 0.3\n")
    (tmp_path / "pickled.npy").write_bytes(b"\x80\x04K\x01.")  # a pickle under a .npy name
    for name in ("e.txt", "pickled.npy"):
        with pytest.raises(IdcraftError) as caught:
            load_embedding(str(tmp_path / name))
        message = str(caught.value)
        assert "expected a .npy/.npz/.safetensors file with one 512-d face embedding" in message
        assert "allow_pickle" not in message and "unsafe" not in message


def test_a_face_embedding_path_in_a_request_is_read(tmp_path):
    from idcraft.requests import GenerationRequest

    (tmp_path / "e.txt").write_text("not numbers")
    request = GenerationRequest("p", face_embeddings=str(tmp_path / "e.txt"))
    assert request.face_embeddings == (str(tmp_path / "e.txt"),)


@pytest.mark.parametrize("name", ["./no/encoder", "/no/such/encoder", "models/image_encoder", "models/x/"])
def test_a_missing_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    from idcraft.prechecks import check_local_path, missing_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/... is then a path here, not an org on the hub
    assert missing_local_path(name)
    with pytest.raises(ModelLoadError, match="no such directory"):
        check_local_path("image encoder", name)
    assert not missing_local_path("h94/IP-Adapter")  # a hub id stays one
    assert not missing_local_path("models")  # exists


def test_load_image_encoder_says_no_such_directory(tmp_path, monkeypatch):
    from idcraft.models import load_image_encoder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match=r"'models/image_encoder': no such directory"):
        load_image_encoder("models/image_encoder")


# ---------------------------------------------------------------------------- faces, named
@pytest.fixture(scope="module")
def world_faces():
    from idcraft.faces import get_face_analyser

    return get_face_analyser("world")


def _identities(photos, every_face=False):
    from idcraft.conditioning import identities_from_photos
    from idcraft.registry import get_method

    return identities_from_photos(
        get_method("faceid"), photos, face_backend="world", every_face=every_face, resize=False
    )


def test_a_face_error_names_the_file(world_faces):
    from idcraft.images import load_image

    with pytest.raises(NoFaceError) as caught:
        _identities([load_image(ASTRONAUT)])  # the photo was read first, as the command line does
    assert str(caught.value).startswith(f"{ASTRONAUT}: no face found")


def test_multi_person_on_a_group_photo_of_world_characters_says_why(tmp_path, world_faces):
    from idcraft.images import load_image
    from idcraft.world.generate import reference_image

    group = Image.new("RGB", (192, 64))
    for i, identity in enumerate((3, 40, 77)):
        group.paste(reference_image(identity), (64 * i, 0))
    group.save(tmp_path / "group.png")
    with pytest.raises(NoFaceError) as caught:
        _identities([load_image(tmp_path / "group.png")], every_face=True)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "group.png"))
    assert "finds at most 1 per image" in message and "own --reference" in message
    assert "no face found" not in message
    # each character as its own reference: one identity each
    assert len(_identities([reference_image(i) for i in (3, 40, 77)])) == 3
