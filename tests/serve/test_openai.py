"""The official ``openai`` package against a real ``idcraft serve`` (uvicorn on 127.0.0.1, the offline
world): text-only ``images.generate``, ``images.edit`` with references, ``models.retrieve``, OpenAI's
``quality``/``style`` accepted with a warning, and a size the world cannot draw refused with a message."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from .conftest import STEPS, pixels, png_bytes

openai = pytest.importorskip("openai", reason="the OpenAI compatibility tests need the openai package")

PROMPT = "a large creature standing in the centre on a beach"


@pytest.fixture
def server(make_app):
    """``(openai client, service)`` talking to a fresh world server on a free local port."""
    from idcraft.serve.server import BackgroundServer

    app, service = make_app()
    with BackgroundServer(app, service.config) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
        yield client, service


def _images(response) -> list[np.ndarray]:
    return [pixels(item.b64_json) for item in response.data]


def _reference(identity: int) -> bytes:
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    return png_bytes(reference_image(held_out_ids()[identity]))


def test_generate_without_a_reference_is_the_base_model_alone(server):
    import torch

    client, _ = server
    settings = {"seed": 5, "steps": STEPS}
    first = client.images.generate(prompt=PROMPT, extra_body=settings)
    assert first.model_dump()["method"] == "none" and first.model_dump()["warnings"] == []
    assert first.model_dump()["size"] == "64x64" and first.model_dump()["cache"] is None
    again = client.images.generate(prompt=PROMPT, extra_body=settings)
    assert np.array_equal(_images(first)[0], _images(again)[0])  # same seed, same image
    # what the world's base model draws with no adapter attached at all (a fresh copy from the bundle)
    from idcraft.models import load_base_pipeline
    from idcraft.world import bundle

    base = load_base_pipeline(bundle.bundle_path(bundle.SD), device=torch.device("cpu"), dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    plain = base(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(5),
        num_inference_steps=STEPS,
        guidance_scale=5.0,
    ).images[0]
    assert np.array_equal(_images(first)[0], np.asarray(plain))


def test_edit_sends_references_as_files(server):
    client, _ = server
    settings = {"seed": 3, "steps": STEPS, "method": "ip-adapter"}
    edited = client.images.edit(
        image=("ref.png", _reference(0), "image/png"), prompt=PROMPT, n=2, size="64x64", extra_body=settings
    )
    assert edited.model_dump()["method"] == "ip-adapter" and len(edited.data) == 2
    # the same request as JSON to /v1/images/generations gives the same images
    same = client.images.generate(
        prompt=PROMPT,
        n=2,
        size="64x64",
        extra_body={**settings, "references": [base64.b64encode(_reference(0)).decode()]},
    )
    assert all(np.array_equal(a, b) for a, b in zip(_images(edited), _images(same), strict=True))
    # a list of files arrives as image[]: two photos of one person for FaceID
    both = client.images.edit(
        image=[("a.png", _reference(1), "image/png"), ("b.png", _reference(2), "image/png")],
        prompt=PROMPT,
        extra_body={"seed": 3, "steps": STEPS, "method": "faceid"},
    )
    assert both.model_dump()["method"] == "faceid" and len(both.data) == 1
    with pytest.raises(openai.BadRequestError, match="inpainting is not supported"):
        client.images.edit(image=("ref.png", _reference(0), "image/png"), prompt=PROMPT, mask=_reference(0))


def test_models_retrieve_and_list(server):
    client, _ = server
    model = client.models.retrieve("ip-adapter")
    assert model.id == "ip-adapter" and model.object == "model" and model.owned_by == "idcraft"
    assert model.model_dump()["sizes"] == {
        "native": "64x64",
        "min": "32x32",
        "max": "128x128",
        "multiple_of": 8,
    }
    assert "beach" in model.model_dump()["vocabulary"]["backgrounds"]
    assert client.models.retrieve("ipadapter").id == "ip-adapter"  # an alias finds its method
    assert client.models.retrieve("none").model_dump()["needs_reference"] is False
    assert [m.id for m in client.models.list()] == [
        "ip-adapter",
        "ip-adapter-plus",
        "faceid",
        "instantid",
        "none",
    ]
    with pytest.raises(openai.NotFoundError, match="no model 'dall-e-3' here"):
        client.models.retrieve("dall-e-3")


def test_quality_and_style_are_accepted_with_a_warning(server):
    client, _ = server
    answer = client.images.generate(
        prompt=PROMPT, quality="hd", style="vivid", extra_body={"seed": 1, "steps": STEPS}
    )
    warnings = answer.model_dump()["warnings"]
    assert len(answer.data) == 1 and len(warnings) == 2
    assert "quality 'hd' is ignored" in warnings[0] and "style 'vivid' is ignored" in warnings[1]


def test_a_size_the_world_cannot_draw_is_a_clear_400(server):
    client, service = server
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt=PROMPT, size="1024x1024")
    message = str(refused.value)
    assert "1024x1024" in message and "native size is 64x64" in message and "32 to 128 pixels" in message
    assert service.metrics is not None and service.scheduler.running == 0  # refused before the queue
    assert (
        client.images.generate(prompt=PROMPT, size="128x128", extra_body={"steps": 1}).model_dump()["size"]
        == "128x128"
    )


def test_unknown_words_are_a_warning(server):
    client, _ = server
    answer = client.images.generate(prompt="a portrait in a garden", extra_body={"steps": 1})
    warnings = " ".join(answer.model_dump()["warnings"])
    assert "does not know the words garden, portrait" in warnings and "beach" in warnings
    image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
    assert image.size == (64, 64)


def test_identitynet_scale_reaches_instantid_only(server):
    client, _ = server
    reference = ("ref.png", _reference(1), "image/png")
    settings = {"seed": 2, "steps": 1, "method": "instantid"}
    full = client.images.edit(image=reference, prompt=PROMPT, extra_body=settings)
    off = client.images.edit(
        image=reference, prompt=PROMPT, extra_body={**settings, "identitynet_scale": 0.0}
    )
    assert off.model_dump()["settings"]["method"] == "instantid"
    assert not np.array_equal(_images(full)[0], _images(off)[0])
    assert "identitynet_scale" in client.models.retrieve("instantid").model_dump()["options"]
    with pytest.raises(openai.BadRequestError, match="identitynet_scale: not used by ip-adapter"):
        client.images.edit(image=reference, prompt=PROMPT, extra_body={"identitynet_scale": 0.5})
