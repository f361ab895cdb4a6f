"""The server on the offline world: one world engine for the whole folder (loading it is the slow part),
fresh applications (own cache, queue, metrics) per test, real uvicorn servers on free local ports."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="idcraft serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the serve tests need httpx")

#: Few steps keep a 64 px world generation at ~0.1-0.5 s on a CPU.
STEPS = 2


@pytest.fixture(scope="session")
def world():
    """The offline world's engine (every bundled method on one miniature SD1.5), built once."""
    from idcraft.world.generate import world_engine

    return world_engine(device="cpu")


def world_catalog(engine, config=None):
    from idcraft.serve.catalog import world_catalog as build
    from idcraft.serve.config import ServeConfig

    return build(config or ServeConfig(), engine)


def make_config(**server):
    from idcraft.serve.config import ServeConfig, ServerConfig

    return ServeConfig(server=ServerConfig(**server))


@pytest.fixture
def make_app(world, monkeypatch):
    """``make_app(engine=None, **server_settings)`` -> (app, service): a fresh server on the world (no
    token required, whatever the environment says; the auth tests set one)."""
    from idcraft.serve.app import create_app

    monkeypatch.delenv("IDCRAFT_API_TOKEN", raising=False)

    def make(engine=None, **server):
        config = make_config(**server)
        app = create_app(config, world_catalog(engine or world, config))
        return app, app.state.service

    return make


@pytest.fixture
def client(make_app):
    from fastapi.testclient import TestClient

    app, _ = make_app()
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def references():
    """Base64 PNGs of three held-out world characters' reference portraits."""
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    return [png_b64(reference_image(i)) for i in held_out_ids()[:3]]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


class GatedEngine:
    """The world engine behind a gate: ``generate`` waits for ``gate`` (or meets the others at
    ``barrier``), or raises ``fail`` -- to hold a device slot as long as a test needs."""

    def __init__(self, engine, *, gate: threading.Event | None = None, barrier=None, fail=None):
        self._engine = engine
        self.gate = gate
        self.barrier = barrier
        self.fail = fail
        self.entered = threading.Semaphore(0)

    def generate(self, request, **kwargs):
        self.entered.release()
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.barrier is not None:
            self.barrier.wait(30)
        return self._engine.generate(request, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)
