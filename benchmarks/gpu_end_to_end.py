"""End-to-end cost of every family at the real shapes, as ratios to the bare base pipeline in the same run.

    python benchmarks/gpu_end_to_end.py                                  # every family, on the GPU
    python benchmarks/gpu_end_to_end.py --families instantid --repeats 5 --output results.json
    python benchmarks/gpu_end_to_end.py --tiny                           # same code, tiny models, CPU (CI)

Random weights at the real shapes (compute does not depend on values): SD1.5 at 512x512 (860M UNet, CLIP
ViT-L text encoder, ViT-H image encoder), SDXL at 1024x1024 (2.6B UNet, both text encoders, IdentityNet =
a ControlNet made from the UNet), FLUX.1-dev at 1024x1024 (12B transformer, T5-XXL, SigLIP-so400m,
DINOv2-giant, the official-size 1.36B InstantCharacter projector). Each model is built straight on the
device in the run's dtype.

End to end = one call of the public API for one image: text encoders, every step, VAE decode, PIL image.
Per family, in this order, each variant timed over ``--repeats`` calls after ``--warmup`` untimed ones:

1. **bare**: the base diffusers pipeline, alone in memory (its peak memory is the reference);
2. **method**: idcraft's pipeline from the reference (CLIP features, face embedding or SigLIP + DINOv2
   features turned into tokens inside the call);
3. **precomputed**: the same with the reference's tokens (InstantCharacter: its features) made beforehand;
4. **bare again**: the base pipeline after the adapter is detached (its weights still resident), so slow
   drift shows up as a difference between the two bare runs.

Per variant: the median and range of the per-image time and the peak GPU memory
(``torch.cuda.max_memory_allocated``, weights included, reset before each call). Time ratios are to the
median of both bare runs, memory ratios to the first. The face families start from a raw identity
embedding (face analysis is not timed: it needs the insightface models).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

FAMILIES = ("ip-adapter", "ip-adapter-plus", "faceid", "instantid", "instantcharacter")
BASE = {
    "ip-adapter": "sd15",
    "ip-adapter-plus": "sd15",
    "faceid": "sd15",
    "instantid": "sdxl",
    "instantcharacter": "flux",
}
#: Per base: output side (real, tiny), default steps, guidance, default dtype.
SETTINGS = {
    "sd15": dict(side=(512, 32), steps=30, guidance=7.5, dtype="float16"),
    "sdxl": dict(side=(1024, 32), steps=30, guidance=5.0, dtype="float16"),
    "flux": dict(side=(1024, 32), steps=28, guidance=3.5, dtype="bfloat16"),
}
PROMPT = "a photo of a person in a garden, detailed"
SEED = 0
GiB = 1024**3

# ----------------------------------------------------------------------------- model configs
# Each entry: (real shapes, tiny shapes). The tiny ones are idcraft.tiny's.
CLIP_L_TEXT = (
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=514),
)
CLIP_BIGG_TEXT = (
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
    ),
    dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=514),
)
CLIP_VIT_H = (
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=14,
        projection_dim=1024,
        hidden_act="gelu",
    ),
    dict(
        hidden_size=48,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=32,
        projection_dim=40,
    ),
)
SD15_UNET = (
    dict(cross_attention_dim=768, sample_size=64),  # diffusers' defaults are SD1.5's block layout
    dict(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    ),
)
_SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
)
SDXL_UNET = (
    _SDXL_BLOCKS
    | dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    _SDXL_BLOCKS
    | dict(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
)
CONTROLNET = ({}, dict(conditioning_embedding_out_channels=(16, 32)))
_VAE_REAL = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)
_VAE_TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
)
SD15_VAE = (_VAE_REAL | dict(sample_size=512, scaling_factor=0.18215), _VAE_TINY)
SDXL_VAE = (_VAE_REAL | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True), _VAE_TINY)
_FLUX_VAE = dict(
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
FLUX_VAE = (
    _VAE_REAL | _FLUX_VAE | dict(sample_size=1024),
    _FLUX_VAE
    | dict(
        latent_channels=4,  # the tiny transformer packs 2x2 of them: 16 in-channels
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
    ),
)
FLUX_TRANSFORMER = (
    dict(guidance_embeds=True),  # diffusers' defaults are FLUX.1's: 19 double + 38 single blocks, 3072 wide
    dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
)
T5_XXL = (
    dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    dict(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    ),
)
SIGLIP = (
    dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14
    ),
    dict(hidden_size=64, intermediate_size=64, num_hidden_layers=27, num_attention_heads=2, patch_size=48),
)
DINOV2 = (
    dict(
        hidden_size=1536,
        num_hidden_layers=40,
        num_attention_heads=24,
        use_swiglu_ffn=True,
        image_size=518,
        patch_size=14,
    ),
    dict(
        hidden_size=64,
        mlp_ratio=1,
        num_hidden_layers=30,
        num_attention_heads=2,
        image_size=384,
        patch_size=48,
    ),
)


def projector_config(tiny: bool):
    from idcraft.instantcharacter.projector import ProjectorConfig

    if tiny:
        from idcraft.instantcharacter.tiny import tiny_projector_config

        return tiny_projector_config()
    return ProjectorConfig.official()  # the released InstantCharacter-FLUX projector


# ----------------------------------------------------------------------------- building
def _pick(config: tuple[dict, dict], tiny: bool) -> dict:
    return dict(config[1] if tiny else config[0])


def clip_text(config: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # the tokenizer is idcraft's byte-level CLIP tokenizer (ids < 514, <|endoftext|> = 513), padded to 77
    config = CLIPTextConfig(
        **({"hidden_act": "quick_gelu", "vocab_size": 49408} | config),
        max_position_embeddings=77,
        projection_dim=config["hidden_size"],
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_encoder(config: dict):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        **config, feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1
    )
    return T5EncoderModel(config).eval()


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New modules are made on ``device`` in ``dtype``: no float32 copy in RAM, no transfer."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """Inside :func:`building`: back to float32 on the CPU (schedulers keep their tables there)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(default)


def build_sd15(tiny: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from idcraft.tiny import tiny_tokenizer

    with plain():
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**_pick(SD15_VAE, tiny)).eval(),
        text_encoder=clip_text(_pick(CLIP_L_TEXT, tiny)),
        tokenizer=tiny_tokenizer(),
        unet=UNet2DConditionModel(**_pick(SD15_UNET, tiny)).eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(tiny: bool):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from idcraft.tiny import tiny_tokenizer

    with plain():
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )
    tokenizer = tiny_tokenizer()
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**_pick(SDXL_VAE, tiny)).eval(),
        text_encoder=clip_text(_pick(CLIP_L_TEXT, tiny)),
        text_encoder_2=clip_text(_pick(CLIP_BIGG_TEXT, tiny), with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**_pick(SDXL_UNET, tiny)).eval(),
        scheduler=scheduler,
    )


def build_flux(tiny: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from idcraft.instantcharacter.tiny import tiny_t5_tokenizer
    from idcraft.tiny import tiny_tokenizer

    with plain():
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(
        scheduler=scheduler,
        vae=AutoencoderKL(**_pick(FLUX_VAE, tiny)).eval(),
        text_encoder=clip_text(_pick(CLIP_L_TEXT, tiny)),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=t5_encoder(_pick(T5_XXL, tiny)),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=FluxTransformer2DModel(**_pick(FLUX_TRANSFORMER, tiny)).eval(),
    )


def clip_vision(tiny: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from idcraft.encoders import ClipImageEncoder

    return ClipImageEncoder(CLIPVisionModelWithProjection(CLIPVisionConfig(**_pick(CLIP_VIT_H, tiny))).eval())


def subject_encoder(tiny: bool):
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    from idcraft.instantcharacter.encoders import SubjectEncoder

    siglip = SiglipVisionModel(SiglipVisionConfig(**_pick(SIGLIP, tiny), image_size=384)).eval()
    return SubjectEncoder(siglip, Dinov2Model(Dinov2Config(**_pick(DINOV2, tiny))).eval())


def keypoints(side: int) -> np.ndarray:
    """One face in the middle of the output (InstantID's five points, output pixels)."""
    unit = np.array([[0.38, 0.40], [0.62, 0.40], [0.50, 0.52], [0.41, 0.64], [0.59, 0.64]])
    return unit * side


def reference_image(side: int = 512) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))


def identity_embedding() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(512) * 20).astype(np.float32)


@dataclass
class Method:
    """The method's two calls (from the reference, from precomputed tokens) and how to take it off."""

    method: Callable[[], object]
    precomputed: Callable[[], object]
    detach: Callable[[], None]
    parameters: dict[str, float] = field(default_factory=dict)  # millions


def _millions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def base_pipeline(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The family's bare diffusers pipeline, built on ``device`` in ``dtype``."""
    base = BASE[name]
    with building(device, dtype):
        pipe = {"sd15": build_sd15, "sdxl": build_sdxl, "flux": build_flux}[base](tiny)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_call(pipe, side: int, steps: int, guidance: float) -> Callable[[], object]:
    def run():
        generator = torch.Generator("cpu").manual_seed(SEED)
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=side,
            height=side,
            generator=generator,
        ).images

    return run


def add_method(name: str, pipe, tiny: bool, device: torch.device, dtype: torch.dtype, common: dict) -> Method:
    """Build the family's adapter (and encoders, ControlNet) and wrap ``pipe`` with idcraft's public API."""
    if name == "instantcharacter":
        from idcraft.instantcharacter.adapter import InstantCharacterAdapter
        from idcraft.instantcharacter.pipeline import InstantCharacterPipeline

        with building(device, dtype):
            adapter = InstantCharacterAdapter.for_transformer(pipe.transformer, projector_config(tiny)).eval()
            encoder = subject_encoder(tiny)
        ic = InstantCharacterPipeline(pipe, adapter, encoder, device=device)
        reference = reference_image()
        features = ic.encode_reference(reference)
        return Method(
            lambda: ic(PROMPT, reference, **common),
            lambda: ic(PROMPT, features=features, **common),
            adapter.detach,
            {
                "transformer": _millions(pipe.transformer),
                "adapter": _millions(adapter),
                "encoders": sum(_millions(m) for m in encoder.models),
            },
        )

    from idcraft.adapter import IPAdapter
    from idcraft.pipeline import IPAdapterPipeline

    with building(device, dtype):
        encoder = clip_vision(tiny) if name.startswith("ip-adapter") else None
        controlnets = None
        if name == "instantid":
            from diffusers import ControlNetModel

            # IdentityNet: an SDXL ControlNet (the tiny VAE downsamples 2x, so its condition embedding does too)
            controlnets = [ControlNetModel.from_unet(pipe.unet, **_pick(CONTROLNET, tiny)).eval()]
        if name == "ip-adapter":
            adapter = IPAdapter.for_unet(pipe.unet, name, encoder.config.projection_dim)
        elif name == "ip-adapter-plus":
            adapter = IPAdapter.for_unet(pipe.unet, name, encoder.config.hidden_size)
        else:  # faceid (LoRA rank 128, as released) and instantid read a 512-value ArcFace embedding
            adapter = IPAdapter.for_unet(pipe.unet, name, 512)
    wrapped = IPAdapterPipeline(pipe, adapter, encoder, controlnet=controlnets)
    sizes = {"unet": _millions(pipe.unet), "adapter": _millions(adapter)}
    if encoder is not None:
        sizes["image_encoder"] = _millions(encoder.model)
    if controlnets:
        sizes["controlnet"] = _millions(controlnets[0])
    if name.startswith("ip-adapter"):
        reference = reference_image()
        tokens = wrapped.encode_references([reference])
        return Method(
            lambda: wrapped(PROMPT, reference, scale=0.8, **common),
            lambda: wrapped(PROMPT, tokens=tokens, scale=0.8, **common),
            adapter.detach,
            sizes,
        )
    embedding = identity_embedding()
    tokens = wrapped.encode_references(face_embeddings=[embedding])
    face = {"keypoints": keypoints(common["width"])} if name == "instantid" else {}
    return Method(
        lambda: wrapped(PROMPT, face_embedding=embedding, scale=0.8, **face, **common),
        lambda: wrapped(PROMPT, tokens=tokens, scale=0.8, **face, **common),
        adapter.detach,
        sizes,
    )


# ----------------------------------------------------------------------------- timing
def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Seconds per call (``repeats`` calls after ``warmup`` untimed ones) and peak GPU memory."""
    for _ in range(warmup):  # kernels chosen, caches filled, allocator grown
        fn()
    cuda = device.type == "cuda"
    times, peaks = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated(device))
    return {
        "seconds": times,
        "median_s": statistics.median(times),
        "peak_bytes": max(peaks) if peaks else None,
    }


def run_family(name: str, args, device: torch.device) -> list[dict]:
    """bare (base pipeline alone in memory) -> method -> precomputed -> bare again (adapter detached)."""
    base = BASE[name]
    dtype = getattr(torch, args.dtype or SETTINGS[base]["dtype"])
    steps = args.steps or SETTINGS[base]["steps"]
    side = SETTINGS[base]["side"][1 if args.tiny else 0]
    guidance = SETTINGS[base]["guidance"]
    common = dict(steps=steps, guidance=guidance, width=side, height=side, seed=SEED, progress=False)

    started = time.perf_counter()
    pipe = base_pipeline(name, args.tiny, device, dtype)
    bare = bare_call(pipe, side, steps, guidance)
    results = {"bare": measure(bare, device, args.repeats, args.warmup)}
    method = add_method(name, pipe, args.tiny, device, dtype, common)
    results["method"] = measure(method.method, device, args.repeats, args.warmup)
    results["precomputed"] = measure(method.precomputed, device, args.repeats, args.warmup)
    method.detach()
    results["bare again"] = measure(bare, device, args.repeats, args.warmup)
    total_s = time.perf_counter() - started

    bare_s = statistics.median(results["bare"]["seconds"] + results["bare again"]["seconds"])
    bare_peak = results["bare"]["peak_bytes"]
    rows = []
    for variant, result in results.items():
        peak = result["peak_bytes"]
        rows.append(
            {
                "family": name,
                "base": base,
                "size": side,
                "steps": steps,
                "dtype": str(dtype).removeprefix("torch."),
                "variant": variant,
                "seconds": result["seconds"],
                "median_s": result["median_s"],
                "ratio_time": result["median_s"] / bare_s,
                "peak_gib": None if peak is None else peak / GiB,
                "ratio_memory": None if peak is None or not bare_peak else peak / bare_peak,
                "parameters_m": method.parameters,
                "family_total_s": total_s,
            }
        )
    del pipe, bare, method
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


VARIANT_LABELS = {
    "bare": "bare base pipeline",
    "method": "method (reference -> tokens in the call)",
    "precomputed": "method, precomputed tokens",
    "bare again": "bare again (after detach)",
}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | base, size, steps, dtype | variant | s / image (median, min-max) | x bare | peak GiB | x bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        times = row["seconds"]
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        ratio_mem = "-" if row["ratio_memory"] is None else f"x{row['ratio_memory']:.3f}"
        lines.append(
            f"| {row['family']} | {row['base']} {row['size']}x{row['size']}, {row['steps']} steps, {row['dtype']} "
            f"| {VARIANT_LABELS[row['variant']]} | {row['median_s']:.3f} ({min(times):.3f}-{max(times):.3f}) "
            f"| x{row['ratio_time']:.3f} | {peak} | {ratio_mem} |"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["threads"] = torch.get_num_threads()
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        metavar="FAMILY",
        help=f"any of {', '.join(FAMILIES)} (default: all)",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: 30 for SD1.5/SDXL, 28 for FLUX)")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="default: float16 for SD1.5/SDXL, bfloat16 for FLUX",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first")
    parser.add_argument("--output", help="write every measurement to this JSON file")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs on the CPU: checks the code, not speed"
    )
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny (CPU) or on a machine with a GPU")
    if args.threads:
        torch.set_num_threads(args.threads)

    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results = {"environment": env, "settings": vars(args), "rows": [], "errors": {}, "markdown": ""}
    for name in args.families:
        try:  # one family failing (out of memory, say) must not lose the others' numbers
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # random VAEs
                family_rows = run_family(name, args, device)
        except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED {results['errors'][name]}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results["rows"] += family_rows
        summary = ", ".join(f"{r['variant']} {r['median_s']:.3f} s" for r in family_rows)
        print(f"{name}: {summary}", flush=True)
        results["markdown"] = markdown(results["rows"])
        if args.output:  # after every family: a run cut short still leaves what it measured
            with open(args.output, "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=2)
    print()
    print(results["markdown"])
    return results


if __name__ == "__main__":
    raise SystemExit(1 if main()["errors"] else 0)
