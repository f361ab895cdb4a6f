"""The InfiniteYou reference fixture (tests/fixtures/infiniteyou) and one engine loaded from it per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CASE = Path(__file__).resolve().parents[1] / "fixtures" / "infiniteyou"


@pytest.fixture(scope="session")
def case() -> Path:
    return CASE


@pytest.fixture(scope="session")
def case_args() -> dict:
    return json.loads((CASE / "args.json").read_text())


@pytest.fixture(scope="session")
def iyou_engine():
    """An engine with the fixture's tiny FLUX base and release, float32 on the CPU."""
    from idcraft.engine import Engine

    return Engine.from_pretrained(
        CASE / "base", CASE / "release", method="infiniteyou", device="cpu", dtype="float32"
    )


def request_for(args: dict, **changes):
    """The fixture case ``args`` as a :class:`GenerationRequest` (embedding and keypoints read)."""
    import numpy as np

    from idcraft.inputs import load_keypoints
    from idcraft.requests import GenerationRequest

    values = dict(
        prompt=args["prompt"],
        method="infiniteyou",
        face_embeddings=[np.load(CASE / "embedding.npy")],
        seed=args["seed"],
        steps=args["steps"],
        width=args["width"],
        height=args["height"],
        guidance=args["guidance"],
        scale=args["infusenet_scale"],
        infusenet_start=args["infusenet_start"],
        infusenet_end=args["infusenet_end"],
        keypoints=load_keypoints(str(CASE / "keypoints.json")) if args["keypoints"] else None,
        negative_prompt=args.get("negative_prompt", ""),
        true_cfg=args.get("true_cfg", 1.0),
    )
    values.update(changes)
    return GenerationRequest(**values)
