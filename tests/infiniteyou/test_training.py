"""InfiniteYou training on the fixture's tiny FLUX: only InfuseNet and the Resampler change, the release
layout is written and loads back into generation, stage 2 starts from stage 1 (and refuses to start
without it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.errors import IdcraftError
from idcraft.training import TrainConfig, Trainer

from .conftest import CASE

KPS = [[10.0, 12.0], [22.0, 12.0], [16.0, 18.0], [11.0, 24.0], [21.0, 24.0]]
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four captioned 32 px photos with precomputed embeddings and keypoints (no face analysis)."""
    root = tmp_path_factory.mktemp("iyou-data")
    rng = np.random.default_rng(3)
    lines = []
    for i in range(4):
        image = rng.integers(0, 200, (32, 32, 3)).astype(np.uint8)
        image[8:24, 8:24] = 40 * i + 60
        Image.fromarray(image).save(root / f"p{i}.png")
        np.save(root / f"e{i}.npy", rng.standard_normal(512).astype(np.float32))
        kps = (np.array(KPS) + i).tolist()
        lines.append({"image": f"p{i}.png", "text": "a portrait photo", "embedding": f"e{i}.npy", "kps": kps})
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _config(data, output, **overrides) -> TrainConfig:
    settings = dict(
        method="infiniteyou",
        base=str(CASE / "base"),
        data=str(data / "data.jsonl"),
        output=str(output),
        resolution=32,
        batch_size=2,
        progress=False,
        tensorboard=False,
        checkpoint_every=1000,
        drop_image=0.1,
        drop_text=0.0,
        drop_both=0.0,
        learning_rate=1e-3,
        seed=1,
        stage=1,
        max_steps=STEPS,
        extra={
            "max_sequence_length": 16,
            "infusenet": {"double": 2, "single": 3},
            "resampler": {"dim": 64, "depth": 1, "heads": 1},
        },
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("iyou-run") / "run"
    cfg = _config(data, output)
    trainer = Trainer(cfg)
    frozen = {k: v.clone() for k, v in _transformer_state(cfg).items()}
    result = trainer.run()
    return cfg, trainer, result, frozen


def _transformer_state(cfg) -> dict:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(cfg.base, subfolder="transformer").state_dict()


def test_trains_infusenet_and_resampler_only(stage1):
    cfg, trainer, result, frozen = stage1
    recipe = trainer.recipe
    assert len(result.losses) == STEPS and np.isfinite(result.losses).all()
    now = recipe.pipe.transformer.state_dict()
    assert all(torch.equal(now[k], frozen[k]) for k in frozen)
    params = {id(p) for p in recipe.trainable_parameters()}
    assert params == {id(p) for p in [*recipe.infusenet.parameters(), *recipe.resampler.parameters()]}
    # InfuseNet started with zero output blocks (from_transformer): training moved them.
    assert any(
        p.abs().sum() > 0 for n, p in recipe.infusenet.named_parameters() if n.startswith("controlnet_blocks")
    )


def test_release_layout_loads_into_generation(stage1):
    from idcraft.engine import Engine
    from idcraft.requests import GenerationRequest

    cfg, *_ = stage1
    folder = cfg.output_dir / "sim_stage1"
    assert (folder / "InfuseNetModel" / "config.json").is_file() and (
        folder / "image_proj_model.bin"
    ).is_file()
    engine = Engine.from_pretrained(
        CASE / "base", cfg.output_dir, method="infiniteyou", model_version="sim_stage1", device="cpu"
    )
    request = GenerationRequest(
        "a portrait photo",
        face_embeddings=[np.load(CASE / "embedding.npy")],
        keypoints=KPS,
        seed=0,
        steps=2,
        width=32,
        height=32,
    )
    image = engine.generate(request).images[0]
    assert image.size == (32, 32)


def test_stage2_needs_and_starts_from_stage1(stage1, data, tmp_path):
    cfg1, *_ = stage1
    with pytest.raises(IdcraftError, match="--init-from"):
        Trainer(_config(data, tmp_path / "bad", stage=2, max_steps=1)).run()
    cfg = _config(data, tmp_path / "aes", stage=2, max_steps=1, init_from=str(cfg1.output_dir / "sim_stage1"))
    Trainer(cfg).run()
    assert (cfg.output_dir / "aes_stage2" / "image_proj_model.bin").is_file()


def test_killed_and_resumed_equals_uninterrupted(data, tmp_path):
    """Kill + resume ends bit-identical to a run that never stopped (identity, text and control drops on:
    every random draw crosses the checkpoint)."""
    from safetensors.torch import load_file

    from ..training.helpers import killed_and_resumed

    common = dict(max_steps=4, checkpoint_every=2, drop_image=0.3, drop_text=0.2, seed=5)
    whole, resumed = killed_and_resumed(lambda out, **more: _config(data, out, **common, **more), tmp_path, 3)
    assert resumed.resumed_from.name == "step-00000002" and resumed.step == 4
    assert resumed.losses == whole.losses[2:]
    for run in ("whole", "killed"):
        assert (tmp_path / run / "sim_stage1" / "image_proj_model.bin").is_file()
    a = load_file(
        str(tmp_path / "whole" / "sim_stage1" / "InfuseNetModel" / "diffusion_pytorch_model.safetensors")
    )
    b = load_file(
        str(tmp_path / "killed" / "sim_stage1" / "InfuseNetModel" / "diffusion_pytorch_model.safetensors")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa = torch.load(tmp_path / "whole" / "sim_stage1" / "image_proj_model.bin", weights_only=True)[
        "image_proj"
    ]
    pb = torch.load(tmp_path / "killed" / "sim_stage1" / "image_proj_model.bin", weights_only=True)[
        "image_proj"
    ]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_settings_refused_before_loading(data, tmp_path):
    with pytest.raises(IdcraftError, match="stages 1 .sim. and 2 .aes."):
        _config(data, tmp_path / "x", stage=3)
    with pytest.raises(IdcraftError, match="init_from .*: no such file"):
        _config(data, tmp_path / "x", init_from=str(tmp_path / "missing"))
    assert _config(data, tmp_path / "x", init_from=str(CASE / "release" / "aes_stage2")).init_from
