"""Tiny random-weight models with the real classes and real structure, built from configs.

Tests, benchmarks and the placeholder demo use these: no download, seconds to build, and every code path
(SD1.5 and SDXL pipelines, CLIP encoders, ControlNet) is the one real checkpoints take. The weights are
random, so images are not meaningful; only the plumbing is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .adapter import IPAdapter

#: Width of the tiny text encoders' token embeddings (SD1.5-like cross-attention width).
TEXT_WIDTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=False))


def tiny_tokenizer(directory: str | Path | None = None):
    """A real ``CLIPTokenizer`` over a byte-level vocabulary (514 entries, no merges): every character of
    a word is one token. Written to ``directory`` (a temporary one by default) and loaded from there."""
    from transformers import CLIPTokenizer

    if directory is None:  # the tokenizer holds its vocabulary in memory, so the folder can go at once
        with tempfile.TemporaryDirectory(prefix="idcraft-tok-") as scratch:
            return tiny_tokenizer(scratch)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    # from_pretrained reads vocab.json + merges.txt under every transformers version (the constructor's
    # argument names changed in transformers 5)
    return CLIPTokenizer.from_pretrained(str(directory), pad_token="<|endoftext|>", model_max_length=77)


def tiny_text_encoder(with_projection: bool = False, hidden: int = TEXT_WIDTH, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=514,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="quick_gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_image_encoder(hidden: int = 48, projection: int = 40, image_size: int = 224, seed: int = 0):
    """A ``CLIPVisionModelWithProjection`` with ``hidden_size`` ``hidden`` and ``projection_dim``
    ``projection`` (so pooled and patch features have different widths, as in real encoders)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        projection_dim=projection,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=32,
        initializer_factor=3.0,
    )
    return CLIPVisionModelWithProjection(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd15_unet(cross_attention_dim: int = TEXT_WIDTH, seed: int = 0):
    """SD1.5's block structure (3 cross-attention down blocks + 1 plain, mirrored up, mid), tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=[32, 32, 64, 64],
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    ).eval()


def tiny_sd15_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_sd15_unet(seed=seed),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_unet(seed: int = 0):
    """SDXL's structure: no attention in the first block, several transformer layers per block,
    text-time added conditioning, cross-attention width = both text encoders' widths together."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=[32, 64, 64],
        layers_per_block=2,
        norm_num_groups=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
    ).eval()


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    tokenizer = tiny_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_text_encoder(True, seed=seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(seed),
        scheduler=scheduler,
    )


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNet initialised from ``unet`` (as ControlNet training starts), conditioning at 8x latent
    size. Its zero-initialised output convolutions get small random weights, so that, unlike a freshly
    initialised ControlNet, it actually changes the UNet's output (tests must be able to see it act)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    zero_convs = [
        *net.controlnet_down_blocks,
        net.controlnet_mid_block,
        net.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, 0.5)
    return net


def random_adapter(
    unet,
    method: str,
    encoder=None,
    *,
    seed: int = 0,
    std: float = 0.3,
    lora_rank: int = 4,
    face_dim: int = 512,
) -> IPAdapter:
    """An adapter of ``method`` shaped for ``unet`` (and ``encoder``, for methods reading CLIP features),
    with random weights that make the image tokens (and FaceID's LoRA) matter: freshly initialised
    to_k_ip/to_v_ip would copy the text projections and a fresh LoRA is zero."""
    from .registry import get_method

    m = get_method(method)
    clip_width = None
    if encoder is not None and m.feature is not None:
        clip_width = encoder.config.projection_dim if m.feature == "pooled" else encoder.config.hidden_size
    width = face_dim if m.needs_face else clip_width
    adapter = IPAdapter.for_unet(unet, m, width, clip_embed_dim=clip_width, lora_rank=lora_rank)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "norm" in name:  # keep LayerNorms at identity: random gains only add noise
                continue
            scale = std / 4 if "_lora." in name else std
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return adapter
