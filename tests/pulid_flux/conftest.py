"""PuLID-FLUX test set-up: the official reference case (tests/fixtures/pulid-flux) and a tiny release that
also carries an IDFormer matched to the shared tiny EVA-CLIP tower (tests/fixtures/pulid-eva)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parents[1] / "fixtures"
CASE = FIXTURES / "pulid-flux"
EVA = FIXTURES / "pulid-eva" / "eva_tiny.pt"


def case_tokens():
    from idcraft.pulid.encoder import IdTokens

    cond = torch.from_numpy(np.load(CASE / "id_tokens.npy"))
    uncond = torch.from_numpy(np.load(CASE / "uncond_tokens.npy"))
    return IdTokens(cond, uncond)


def case_args(name: str = "args.json") -> dict:
    return json.loads((CASE / name).read_text())


def tiny_id_former(seed: int = 0):
    """An IDFormer reading the tiny EVA tower (class token 24, width 32) and making tokens of the
    fixture's ID width (32)."""
    from idcraft.pulid.idformer import IDFormer

    torch.manual_seed(seed)
    return IDFormer(
        dim=32,
        depth=5,
        heads=1,
        num_id_token=2,
        num_queries=32,
        output_dim=32,
        id_dim=512 + 24,
        vit_dim=32,
        mapping_dim=20,
    ).eval()


@pytest.fixture(scope="session")
def flux_base():
    """The reference case's FluxPipeline (3 double + 5 single blocks, 16 latent channels)."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(CASE / "base"))


@pytest.fixture(scope="session")
def release_tensors():
    """A full release: the tiny IDFormer as pulid_encoder.* and the fixture's pulid_ca.*."""
    from safetensors.torch import load_file

    tensors = {f"pulid_encoder.{k}": v for k, v in tiny_id_former().state_dict().items()}
    release = load_file(str(CASE / "pulid_flux_tiny.safetensors"))
    tensors.update({k: v for k, v in release.items() if k.startswith("pulid_ca.")})
    return tensors


@pytest.fixture(scope="session")
def saved(tmp_path_factory, release_tensors):
    """On disk as users have them: the release (.safetensors), a raw embedding, an aligned face and its
    label map."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pulid_flux")
    save_file(release_tensors, str(root / "pulid_flux.safetensors"))
    rng = np.random.default_rng(0)
    np.save(root / "emb.npy", (rng.standard_normal(512) * 20).astype(np.float32))
    y, x = np.mgrid[0:512, 0:512]
    face = np.stack([x // 2 % 256, y // 2 % 256, (x + y) // 4 % 256], -1).astype(np.uint8)
    Image.fromarray(face).save(root / "face.png")
    labels = np.zeros((512, 512), np.uint8)
    labels[100:400, 120:390] = 1  # skin
    labels[200:240, 180:230] = 4  # an eye
    labels[400:, :] = 16  # cloth
    Image.fromarray(labels).save(root / "labels.png")
    return root
