"""Tiny random-weight FLUX pipeline, SigLIP, DINOv2 and InstantCharacter adapter, built from configs.

The real classes with the real structure at toy widths, for tests and benchmarks: no download, seconds to
build. Both encoders have enough layers for the official hidden-state indices (SigLIP 27 layers,
DINOv2 30), a 48-pixel patch (8 x 8 tokens per 384 view) and widths that are multiples of the projector's
64-wide heads. The T5 tokenizer is a Unigram model built in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny import TEXT_WIDTH, tiny_text_encoder, tiny_tokenizer
from .adapter import InstantCharacterAdapter
from .projector import ProjectorConfig

#: Width of the tiny T5 encoder (FLUX's joint attention width; the subject tokens have it too).
T5_WIDTH = 32
SIGLIP_WIDTH = 64
DINOV2_WIDTH = 64


def tiny_t5_tokenizer(directory: str | Path | None = None):
    """A ``T5TokenizerFast`` (a SentencePiece-style Unigram model) over a few words and every lowercase
    letter, with T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and its ``</s>`` appended.
    Built in memory; written to ``directory`` when given."""
    from transformers import T5TokenizerFast

    words = ["cat", "dog", "photo", "of", "on", "in", "the", "garden", "portrait", "painting"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(chr(c), -3.0) for c in range(ord("a"), ord("z") + 1)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_t5_encoder(seed: int = 0, vocab_size: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_flux_transformer(seed: int = 0, double: int = 1, single: int = 2):
    """FLUX's structure (double- then single-stream blocks, guidance embedding, 3-axis RoPE), tiny widths:
    2 heads of 16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _flux_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()


def tiny_flux_pipeline(seed: int = 0, double: int = 1, single: int = 2):
    """A ``FluxPipeline`` with every real component class: CLIP + T5 text encoders, the FLUX transformer
    (``double`` + ``single`` blocks), a VAE with 4x downsampling and FLUX's shift/scale, the flow-matching
    scheduler with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_flux_vae(seed),
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=tiny_flux_transformer(seed, double, single),
    )


def tiny_siglip(seed: int = 0, layers: int = 27):
    """``SiglipVisionModel`` at 384 with 48-pixel patches (64 tokens per view)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=SIGLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=384,
        patch_size=48,
    )
    return SiglipVisionModel(config).eval()


def tiny_dinov2(seed: int = 0, layers: int = 30):
    """``Dinov2Model`` with 48-pixel patches (64 patch tokens + class token per 384 view)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=DINOV2_WIDTH,
        mlp_ratio=1,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=384,
        patch_size=48,
    )
    return Dinov2Model(config).eval()


def tiny_subject_encoder(seed: int = 0):
    from .encoders import SubjectEncoder

    return SubjectEncoder(tiny_siglip(seed), tiny_dinov2(seed))


def save_tiny_encoders(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny SigLIP and DINOv2 folder (weights, config, processor) as the hub folders look."""
    from .encoders import load_dinov2_processor, load_siglip_processor

    directory = Path(directory)
    siglip, dinov2 = directory / "siglip", directory / "dinov2"
    tiny_siglip(seed).save_pretrained(siglip)
    load_siglip_processor().save_pretrained(siglip)
    tiny_dinov2(seed).save_pretrained(dinov2)
    load_dinov2_processor().save_pretrained(dinov2)
    return siglip, dinov2


def tiny_projector_config(blocks: int = 1, depth: int = 2, tokens: int = 16) -> ProjectorConfig:
    """The official projector's structure at the tiny encoders' width (64 + 64), 64-wide heads."""
    width = SIGLIP_WIDTH + DINOV2_WIDTH
    return ProjectorConfig(
        width=width,
        cross_layer_blocks=blocks,
        cross_scale_blocks=blocks,
        block_ff_inner=4 * width,
        mlp_hidden=2 * width,
        resampler_width=128,
        resampler_depth=depth,
        resampler_ff_inner=4 * 128,
        num_tokens=tokens,
        output_width=T5_WIDTH,
        timestep_channels=320,
    )


def random_instantcharacter(
    transformer, seed: int = 0, std: float = 0.3, **config
) -> InstantCharacterAdapter:
    """An adapter shaped for ``transformer`` with random weights that make the subject branch matter
    (norm gains stay at one)."""
    adapter = InstantCharacterAdapter.for_transformer(transformer, tiny_projector_config(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "norm" in name or name.endswith(".scale"):
                continue
            fan_in = param.shape[-1] if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) * std / max(1.0, fan_in**0.5) * 4)
    return adapter.eval()
