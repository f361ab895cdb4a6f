"""Tiny InstantCharacter set-up shared by this folder's tests, built once per session (seconds, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.instantcharacter.tiny import (
    random_instantcharacter,
    save_tiny_encoders,
    tiny_flux_pipeline,
    tiny_subject_encoder,
)


@pytest.fixture(scope="session")
def flux():
    """A tiny FluxPipeline (1 double + 2 single blocks). Tests that attach must detach."""
    return tiny_flux_pipeline()


@pytest.fixture(scope="session")
def subject_encoder():
    return tiny_subject_encoder()


@pytest.fixture(scope="session")
def ic_adapter(flux):
    return random_instantcharacter(flux.transformer)


@pytest.fixture(scope="session")
def subject_image() -> Image.Image:
    """A non-square reference with structure in every tile."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:120]
    img = np.stack([x * 2 % 256, y * 3 % 256, (x + y) % 256], -1).astype(np.uint8)
    img[20:50, 30:70] = rng.integers(0, 255, size=(30, 40, 3))
    return Image.fromarray(img)


@pytest.fixture(scope="session")
def features(subject_encoder, subject_image):
    return subject_encoder.encode(subject_image)


@pytest.fixture(scope="session")
def saved(tmp_path_factory, flux, ic_adapter, subject_image):
    """On disk as users have them: a FLUX folder, SigLIP and DINOv2 folders, a bf16 official-layout adapter
    (.safetensors and .bin) and a reference image."""
    from idcraft.checkpoints import AdapterCheckpoint, save_checkpoint

    root = tmp_path_factory.mktemp("ic")
    flux.save_pretrained(root / "flux")
    save_tiny_encoders(root)
    groups = ic_adapter.to_checkpoint().groups()
    bf16 = AdapterCheckpoint(*({k: t.to(torch.bfloat16) for k, t in g.items()} for g in groups.values()))
    save_checkpoint(bf16, root / "ic.safetensors")
    save_checkpoint(bf16, root / "ic.bin")
    subject_image.save(root / "ref.png")
    return root
