"""Shared training-test material: tiny bases and encoder saved once per session, tiny image sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import make_images


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One intra-op thread for the training tests: the tiny models gain nothing from a second one, and
    OpenMP threads on a busy two-core machine spin and slow down fifty-fold (measured). Package-scoped,
    so module fixtures that train run under it too (bit-identity comparisons need one thread count);
    restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """``{"sd15", "sdxl", "encoder"}`` folders of tiny random-weight models, as ``idcraft train`` loads them."""
    from idcraft.tiny import tiny_image_encoder, tiny_sd15_pipeline, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("models")
    tiny_sd15_pipeline().save_pretrained(root / "sd15")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    tiny_image_encoder().save_pretrained(root / "encoder")
    return {"sd15": root / "sd15", "sdxl": root / "sdxl", "encoder": root / "encoder"}


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    make_images(folder, 4)
    return folder
