"""Every official IP-Adapter-family layout in ../shared/formats is detected and rebuilt from its shapes.

The layouts list each official file's ``image_proj`` keys and shapes and its published parameter counts;
building our projection from those shapes (on the meta device: no memory) must give the same key set and
the same parameter count, which pins widths, depth, token count and head layout.
"""

from __future__ import annotations

import json

import pytest
import torch

from idcraft.errors import CheckpointError
from idcraft.projections import PROJECTIONS
from idcraft.registry import detect_method, get_method, resolve_method

from .conftest import shared_path

SUPPORTED = {
    "ip-adapter_sd15 (ViT-H proj_dim=1024)": (
        "ip-adapter",
        {"num_tokens": 4, "embed_dim": 1024, "cross_attention_dim": 768},
    ),
    "ip-adapter_sd15_vit-G (bigG proj_dim=1280)": ("ip-adapter", {"num_tokens": 4, "embed_dim": 1280}),
    "ip-adapter-plus_sd15 / plus-face_sd15 (Resampler 16 q, ViT-H hidden 1280)": (
        "ip-adapter-plus",
        {"dim": 768, "heads": 12, "num_queries": 16, "embed_dim": 1280},
    ),
    "ip-adapter-full-face_sd15 (MLPProjModel hidden 1280)": (
        "ip-adapter-full-face",
        {"embed_dim": 1280, "cross_attention_dim": 768},
    ),
    "ip-adapter_sdxl (bigG proj_dim=1280)": (
        "ip-adapter",
        {"num_tokens": 4, "embed_dim": 1280, "cross_attention_dim": 2048},
    ),
    "ip-adapter_sdxl_vit-h (ViT-H proj_dim=1024)": ("ip-adapter", {"num_tokens": 4, "embed_dim": 1024}),
    "ip-adapter-plus_sdxl_vit-h / plus-face_sdxl_vit-h (Resampler dim1280 20 heads, 16 q)": (
        "ip-adapter-plus",
        {"dim": 1280, "heads": 20, "embed_dim": 1280, "output_dim": 2048},
    ),
    "ip-adapter-faceid_sd15 (MLP 512->1024->4x768, LoRA r128)": (
        "faceid",
        {"embed_dim": 512, "hidden_dim": 1024, "num_tokens": 4, "cross_attention_dim": 768},
    ),
    "ip-adapter-faceid-plus(v2)_sd15 (ProjPlusModel, LoRA r128)": (
        "faceid-plus",
        {"num_tokens": 4, "clip_embed_dim": 1280, "heads": 12, "depth": 4},
    ),
    "ip-adapter-faceid_sdxl (MLP 512->1024->4x2048, LoRA r128)": (
        "faceid",
        {"num_tokens": 4, "cross_attention_dim": 2048},
    ),
    "ip-adapter-faceid-plusv2_sdxl (ProjPlusModel, LoRA r128)": (
        "faceid-plus",
        {"cross_attention_dim": 2048, "heads": 32, "clip_embed_dim": 1280},
    ),
    "ip-adapter-faceid-portrait_sd15 (MLP 512->1024->16x768, no LoRA)": (
        "faceid-portrait",
        {"num_tokens": 16},
    ),
    "ip-adapter-faceid-portrait_sdxl (MLP ->16x2048, no LoRA) [UNVERIFIED file exists]": (
        "faceid-portrait",
        {"num_tokens": 16, "cross_attention_dim": 2048},
    ),
    "InstantID ip-adapter.bin (Resampler 512->1280, 16q, out 2048)": (
        "instantid",
        {"dim": 1280, "heads": 20, "num_queries": 16, "embed_dim": 512, "output_dim": 2048, "depth": 4},
    ),
}


def _layouts() -> dict:
    return json.loads(shared_path("formats", "ipadapter_layouts.json").read_text())


def _meta_state(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_official_layout_detected_and_rebuilt(name):
    layout = _layouts()[name]
    method_name, expected_config = SUPPORTED[name]
    image_proj = _meta_state(layout["image_proj"])
    ip_adapter = _meta_state(layout["ip_adapter_sample"])
    method = detect_method(image_proj, ip_adapter)
    assert method.name == method_name
    cls = PROJECTIONS[method.projection]
    config = cls.config_from_state_dict(image_proj)
    for key, value in expected_config.items():
        assert config[key] == value, (key, config)
    with torch.device("meta"):
        model = cls(**config)
    assert set(model.state_dict()) == set(layout["image_proj"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout["image_proj"]
    assert sum(p.numel() for p in model.parameters()) == layout["params_image_proj"]
    per_layer = 8 if method.lora else 2  # to_k_ip/to_v_ip, or LoRA down/up x q/k/v/out
    extra = 2 * len([i for i in layout["ip_adapter_indices"] if i % 2]) if method.lora else 0
    assert len(layout["ip_adapter_indices"]) * per_layer + extra == layout["ip_adapter_keys_count"]
    if method.lora:  # layer 0 (a self-attention layer) carries LoRA only; rank and widths from shapes
        from idcraft.adapter import _processor_from_tensors
        from idcraft.injection import TokenLayout

        layer0 = {
            k.split(".", 1)[1]: torch.zeros(v)
            for k, v in layout["ip_adapter_sample"].items()
            if k.startswith("0.")
        }
        proc = _processor_from_tensors(0, layer0, TokenLayout(), name)
        assert (proc.lora_rank, proc.has_image) == (128, False)
        assert proc.width == layout["ip_adapter_sample"]["0.to_q_lora.up.weight"][0]


def test_ip_adapter_indices_follow_diffusers_processor_order():
    """The official numbering (odd = attn2, down/up/mid) is diffusers' attn_processors order."""
    from diffusers import UNet2DConditionModel

    from idcraft.injection import cross_attention_layers

    layouts = _layouts()
    sd15_order = [entry.split(": ")[1] for entry in layouts["sd15_attn_processor_order"]]
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' default config is SD1.5's
    assert list(unet.attn_processors) == sd15_order
    assert (
        sorted(cross_attention_layers(unet))
        == layouts["ip-adapter_sd15 (ViT-H proj_dim=1024)"]["ip_adapter_indices"]
    )


def test_explicit_method_must_match_the_keys():
    layout = _layouts()["ip-adapter-plus_sd15 / plus-face_sd15 (Resampler 16 q, ViT-H hidden 1280)"]
    image_proj = _meta_state(layout["image_proj"])
    assert resolve_method("ip-adapter-plus-face", image_proj, {}).name == "ip-adapter-plus-face"
    assert resolve_method("ip-adapter-plus_sd15.bin", image_proj, {}).name == "ip-adapter-plus"
    with pytest.raises(CheckpointError, match="--method ip-adapter-plus"):
        resolve_method("ip-adapter", image_proj, {})
    assert get_method("IPAdapter").name == "ip-adapter"


@pytest.mark.parametrize(
    "layout, filename, expected",
    [
        (
            "ip-adapter-faceid-plus(v2)_sd15 (ProjPlusModel, LoRA r128)",
            "ip-adapter-faceid-plusv2_sd15.bin",
            "faceid-plusv2",
        ),
        (
            "ip-adapter-faceid-plus(v2)_sd15 (ProjPlusModel, LoRA r128)",
            "/models/ip-adapter-faceid-plus_sd15.bin",
            "faceid-plus",
        ),
        (
            "ip-adapter-faceid-plus(v2)_sd15 (ProjPlusModel, LoRA r128)",
            "my_finetune.safetensors",
            "faceid-plus",
        ),
        (
            "ip-adapter-plus_sdxl_vit-h / plus-face_sdxl_vit-h (Resampler dim1280 20 heads, 16 q)",
            "ip-adapter-plus-face_sdxl_vit-h.safetensors",
            "ip-adapter-plus-face",
        ),
    ],
)
def test_official_file_names_settle_what_keys_cannot(layout, filename, expected):
    entry = _layouts()[layout]
    method = detect_method(
        _meta_state(entry["image_proj"]), _meta_state(entry["ip_adapter_sample"]), filename
    )
    assert method.name == expected
