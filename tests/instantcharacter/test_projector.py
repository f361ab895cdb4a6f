"""The projector: the official layout exactly (keys, shapes, order, parameter counts), shapes, timestep."""

from __future__ import annotations

import json

import torch

from idcraft.instantcharacter.processors import SubjectAttnProcessor, SubjectState
from idcraft.instantcharacter.projector import ProjectorConfig, SubjectProjector

from ..conftest import shared_path


def _layout() -> dict:
    return json.loads(shared_path("formats", "instantcharacter_layout.json").read_text())


def test_official_layout_is_reproduced_key_for_key():
    layout = _layout()
    shapes = {k: torch.empty(v, device="meta") for k, v in layout["image_proj"].items()}
    config = ProjectorConfig.from_state_dict(shapes)
    assert config == ProjectorConfig(
        width=2688,
        cross_layer_blocks=4,
        cross_scale_blocks=4,
        block_ff_inner=10752,
        mlp_hidden=5376,
        resampler_width=1280,
        resampler_depth=4,
        resampler_ff_inner=5120,
        num_tokens=1024,
        output_width=4096,
        timestep_channels=320,
    )
    assert ProjectorConfig.official() == config  # what the benchmarks and training build
    with torch.device("meta"):
        projector = SubjectProjector(config)
        layer = SubjectAttnProcessor(3072, 4096, 128, SubjectState())
    state = projector.state_dict()
    assert [(k, list(t.shape)) for k, t in state.items()] == list(layout["image_proj"].items())
    assert sum(t.numel() for t in state.values()) == layout["summary"]["image_proj_nparams"]
    first = layout["summary"]["ip_adapter_keys_first_layer"]
    assert [(f"0.{k}", list(t.shape)) for k, t in layer.state_dict().items()] == list(first.items())
    per_layer = sum(t.numel() for t in layer.state_dict().values())
    assert per_layer * layout["summary"]["ip_adapter_num_layers"] == layout["summary"]["ip_adapter_nparams"]


def test_shapes_and_split_equals_whole(ic_adapter, features):
    projector = ic_adapter.projector
    prepared = ic_adapter.prepare(features)
    assert prepared.shape == (1, 2 * 64, 128)  # cross-scale half then cross-layer half, P = 64 each
    t = torch.tensor([700.0])
    with torch.no_grad():
        tokens = projector.tokens(prepared, t)
        whole = projector(features.low_res_shallow, features.low_res_deep, features.high_res_deep, t)
        later = projector.tokens(prepared, torch.tensor([50.0]))
    assert tokens.shape == (1, 16, 32)  # num_tokens x output width (the tiny T5 width)
    assert torch.equal(tokens, whole)
    assert not torch.allclose(tokens, later)  # the resampler reads the timestep
