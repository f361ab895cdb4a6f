"""Tiny models on disk for the evaluation tests: an SD1.5 base with IP-Adapter and FaceID adapters, a CLIP
image encoder, a random LoRA in diffusers format, tiny CLIP and DINOv2 scoring models, a tiny
insightface-style ONNX pack, face photos and a models.yaml naming them all. Built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

PROMPTS = ("a person on a beach", "a portrait in the snow")


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models gain nothing from a second, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def face_photo(seed: int, size: int = 256) -> Image.Image:
    """A black photo with a bright textured square the tiny detector reads as a face; the texture (and so
    the tiny recogniser's embedding) depends on ``seed``."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    lo, hi = size // 4, 3 * size // 4
    blocks = rng.integers(200, 256, ((hi - lo) // 16, (hi - lo) // 16, 3))
    image[lo:hi, lo:hi] = np.kron(blocks, np.ones((16, 16, 1))).astype(np.uint8)
    return Image.fromarray(image)


def save_lora(unet_source, path: Path) -> Path:
    """A random LoRA (rank 4, attention projections) for ``unet_source``'s architecture, written in the
    diffusers format (``unet.``-prefixed peft keys) as ``path``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    unet_source.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet_source))
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=layers, weight_name=path.name, safe_serialization=True
    )
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Paths of every tiny model, the photos and ``models.yaml``."""
    for module in ("cv2", "onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(module)
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    from idcraft.checkpoints import save_checkpoint
    from idcraft.encoders import ClipImageEncoder
    from idcraft.tiny import random_adapter, tiny_image_encoder, tiny_sd15_pipeline, tiny_tokenizer

    from ..faces.tiny_onnx import build_arcface, build_scrfd

    root = tmp_path_factory.mktemp("evalworld")
    base = tiny_sd15_pipeline()
    base.save_pretrained(root / "sd15")
    encoder = tiny_image_encoder()
    encoder.save_pretrained(root / "encoder")
    wrapped = ClipImageEncoder(encoder)
    save_checkpoint(
        random_adapter(base.unet, "ip-adapter", wrapped, seed=1).to_checkpoint(),
        root / "ip-adapter.safetensors",
    )
    save_checkpoint(random_adapter(base.unet, "faceid", seed=2).to_checkpoint(), root / "faceid.safetensors")
    lora = save_lora(tiny_sd15_pipeline().unet, root / "lcm" / "pytorch_lora_weights.safetensors")

    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=514,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32
    )
    CLIPModel(
        CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=16)
    ).save_pretrained(root / "clip")
    tiny_tokenizer(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(root / "dino")
    BitImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root / "dino")

    pack = root / "antelopev2"
    build_scrfd(pack / "scrfd_10g_bnkps.onnx")
    build_arcface(pack / "glintr100.onnx")

    refs = root / "refs"
    refs.mkdir()
    face_photo(10).save(refs / "alice.png")
    face_photo(11).save(refs / "alice.gt.png")
    (refs / "bob").mkdir()
    face_photo(20).save(refs / "bob" / "1.png")
    face_photo(21).save(refs / "bob" / "2.png")

    config = root / "models.yaml"
    config.write_text(
        "models:\n"
        "  ip-adapter:\n"
        "    base: sd15\n    adapter: ip-adapter.safetensors\n    image_encoder: encoder\n"
        "  faceid:\n"
        "    base: sd15\n    adapter: faceid.safetensors\n"
        "recipes:\n"
        "  lcm: {recipe: lcm-lora, lora: lcm/pytorch_lora_weights.safetensors, steps: [2]}\n"
        "device: cpu\n"
        "face_backend: insightface\n"
        "face_models: antelopev2\n"
        "scoring: {clip: clip, dino: dino}\n"
    )
    return {
        "root": root,
        "config": config,
        "sd15": root / "sd15",
        "encoder": root / "encoder",
        "lora": lora,
        "clip": root / "clip",
        "dino": root / "dino",
        "pack": pack,
        "refs": refs,
    }


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Counts what the engine generates (requests through ``generate``/``generate_batch``) and how many
    engines are loaded from the config."""
    from idcraft import model_config
    from idcraft.engine import Engine

    counts = {"requests": 0, "calls": 0, "loads": 0}
    generate, generate_batch, load = Engine.generate, Engine.generate_batch, model_config.load_engine

    def counted_generate(self, request):
        counts["requests"] += 1
        counts["calls"] += 1
        return generate(self, request)

    def counted_batch(self, requests):
        counts["calls"] += 1
        before = counts["requests"]
        results = generate_batch(self, requests)
        counts["requests"] = before + len(requests)  # a fallback to generate() is not counted twice
        return results

    def counted_load(*args, **kwargs):
        counts["loads"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counted_generate)
    monkeypatch.setattr(Engine, "generate_batch", counted_batch)
    monkeypatch.setattr(model_config, "load_engine", counted_load)
    return counts
