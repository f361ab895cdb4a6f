"""Issue 28: no raw exception at the library's door -- wrong types, over-budget requests, pickles with
code, keypoints off the image -- each an IdcraftError that names what was wrong and what to do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcraft.errors import CheckpointError, IdcraftError
from idcraft.requests import GenerationRequest, Limits

ASTRONAUT = Path(__file__).parent / "data" / "astronaut.jpg"


# ---------------------------------------------------------------------------- types at the door
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"references": 5}, "references"),
        ({"references": [ASTRONAUT, 3.5]}, "references[1]"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 12}, "prompt"),
        ({"negative_prompt": ["x"]}, "negative_prompt"),
        ({"method": 3}, "method"),
        ({"steps": "30"}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"width": "512"}, "width"),
        ({"num_images": None}, "num_images"),
        ({"seed": "1"}, "seed"),
        ({"scale": "high"}, "scale"),
        ({"guidance": [7.5]}, "guidance"),
        ({"s_scale": None}, "s_scale"),
        ({"true_cfg": True}, "true_cfg"),
        ({"face_index": 1.0}, "face_index"),
        ({"multi_person": "yes"}, "multi_person"),
        ({"controlnet_scales": ["a"]}, "controlnet_scales"),
        ({"control_images": {"a": 1}}, "control_images"),
        ({"keypoints": [["a", "b"]]}, "keypoints"),
        ({"face_embeddings": 7}, "face_embeddings"),
        ({"face_embeddings": [None]}, "face_embeddings[0]"),
    ],
)
def test_a_wrong_type_names_the_field_and_the_type(fields, named):
    with pytest.raises(IdcraftError) as caught:
        GenerationRequest(**{"prompt": "p", **fields})
    message = str(caught.value)
    assert f"GenerationRequest.{named} must be" in message and "got" in message and "\n" not in message


def test_one_path_or_image_is_one_reference():
    image = Image.new("RGB", (8, 8))
    assert GenerationRequest("p", references=str(ASTRONAUT)).references == (str(ASTRONAUT),)
    assert GenerationRequest("p", references=ASTRONAUT).references == (ASTRONAUT,)
    assert GenerationRequest("p", references=image).references == (image,)
    assert GenerationRequest("p", references=None).references == ()
    data = ASTRONAUT.read_bytes()
    assert GenerationRequest("p", references=data).references == (data,)
    vector = np.ones(512, np.float32)
    assert len(GenerationRequest("p", face_embeddings=vector).face_embeddings) == 1
    assert len(GenerationRequest("p", face_embeddings=np.ones((2, 512))).face_embeddings) == 2
    assert GenerationRequest("p", controlnet_scales=0.5).controlnet_scales == (0.5,)


def test_bytes_references_are_decoded_as_image_files():
    from idcraft.errors import ImageError
    from idcraft.images import load_image

    assert load_image(ASTRONAUT.read_bytes()).size == Image.open(ASTRONAUT).size
    with pytest.raises(ImageError, match="not an image file"):
        load_image(b"hello")


def test_a_field_set_wrong_after_construction_is_still_refused():
    request = GenerationRequest("p")
    request.steps = "many"
    with pytest.raises(IdcraftError, match=r"GenerationRequest\.steps must be a whole number"):
        request.validate()


def test_engine_refuses_what_is_not_a_request():
    from idcraft.engine import Engine

    engine = Engine.__new__(Engine)  # the door is checked before anything of the engine is used
    with pytest.raises(IdcraftError, match=r"got a dict: build one with GenerationRequest\(\*\*fields\)"):
        engine.generate({"prompt": "p"})
    with pytest.raises(IdcraftError, match="expected a GenerationRequest, got str"):
        engine.encode("a cat")
    with pytest.raises(IdcraftError, match="takes a list of GenerationRequest"):
        engine.generate_batch(GenerationRequest("p"))
    with pytest.raises(IdcraftError, match="got a dict"):
        engine.generate_batch([{"prompt": "p"}])


# ---------------------------------------------------------------------------- compute budget
@pytest.mark.parametrize(
    ("size", "steps", "images"),
    [(64, 30, 16), (512, 50, 16), (1024, 50, 4), (1024, 30, 4), (1024, 50, 1), (2048, 50, 1)],
)
def test_normal_requests_are_within_the_default_budget(size, steps, images):
    GenerationRequest("p", width=size, height=size, steps=steps, num_images=images).validate()


def test_an_over_budget_request_says_its_cost_the_limit_and_what_fits():
    request = GenerationRequest("p", width=1024, height=1024, steps=50, num_images=16)
    with pytest.raises(IdcraftError) as caught:
        request.validate()
    message = str(caught.value)
    assert "16 image(s) x 1024x1024 x 50 steps = 839 million pixel-steps" in message
    assert "limit of 210 million" in message and "at most 4 image(s)" in message
    with pytest.raises(IdcraftError, match="limit of 1 million"):
        GenerationRequest("p", width=64, height=64, steps=300).validate(Limits(max_pixel_steps=10**6))


def test_the_server_config_sets_the_budget(tmp_path):
    from idcraft.model_config import read_section

    limits = read_section(Limits, {"max_pixel_steps": 1000}, "limits")
    assert limits.max_pixel_steps == 1000


# ---------------------------------------------------------------------------- keypoints
def test_keypoints_outside_the_output_are_refused():
    kps = [[10, 10], [50, 10], [30, 30], [15, 50], [45, 50]]
    GenerationRequest("p", keypoints=kps, width=64, height=64).validate()
    far = [[10, 10], [50, 10], [30, 3000], [15, 50], [45, 50]]
    with pytest.raises(IdcraftError, match=r"keypoint \[30, 3000\] of face 0 is outside the output \(64x64\)"):
        GenerationRequest("p", keypoints=far, width=64, height=64).validate()
    with pytest.raises(IdcraftError, match="outside"):
        GenerationRequest("p", keypoints=np.array([[-5.0, 1.0]] * 5), width=64, height=64).validate()


# ---------------------------------------------------------------------------- pickles with code
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran > " + os.devnull,))


@pytest.mark.parametrize("payload", [_RunsCode(), {"w": Limits()}])
def test_a_bin_with_code_is_refused_in_idcrafts_words(tmp_path, payload):
    import torch

    from idcraft.checkpoints import load_checkpoint

    path = tmp_path / "adapter.bin"
    torch.save({"image_proj": {}, "ip_adapter": payload}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "refused: the file contains Python code/objects that are not plain tensors" in message
    assert "idcraft only loads weights" in message and ".safetensors" in message
    assert "weights_only" not in message and "unsafe" not in message
