"""Every family generates in float16 and bfloat16 (tiny random models, CPU): nothing is upcast on the way,
the image is finite, and it stays close to the float32 image of the same seed.

What breaks in half precision is plumbing: a component silently moved back to float32 (diffusers'
``from_pipe`` does that unless told the dtype), features entering the adapter in the encoder's dtype, a
float32 tensor meeting a half weight. Such bugs either raise (``expected mat1 and mat2 to have the same
dtype``) or upcast a module; both are caught here. Where the CPU build of torch has no half kernel for an
operation, the case is skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.encoders import ClipImageEncoder
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import (
    random_adapter,
    tiny_controlnet,
    tiny_image_encoder,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

KPS = np.array([[20, 24], [44, 24], [32, 36], [22, 48], [42, 48]], np.float32)
RUN = dict(steps=2, seed=7, progress=False)
#: Mean absolute difference (pixels, 0-255) from the float32 image of the same seed. Measured on these
#: tiny random models (CPU, torch 2.x, diffusers 0.42): float16 0.08-0.12 px (IP-Adapter 0.11, Plus 0.12,
#: FaceID 0.11, InstantID 0.08, InstantID + ControlNet 0.08, InstantCharacter 0.08); bfloat16 0.73-1.01 px
#: (0.85, 1.00, 0.93, 0.74, 0.73, 1.01). The limits leave 2-3x margin and stay below what dropping the
#: adapter does to these images (scale 0.8 -> 0: 2.3 px for InstantID, 3.3 for InstantCharacter, 23-28
#: for the SD1.5 families), so an adapter silently cut off in half precision fails too.
TOLERANCE = {torch.float16: 0.4, torch.bfloat16: 2.0}


def _reference() -> Image.Image:
    y, x = np.mgrid[0:96, 0:128]
    return Image.fromarray(np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], -1).astype(np.uint8))


def _embedding() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(512) * 20).astype(np.float32)


# ----------------------------------------------------------------------------- builders, one per case
def _ip_adapter(method: str, dtype: torch.dtype):
    base = tiny_sd15_pipeline().to(dtype)
    encoder = ClipImageEncoder(tiny_image_encoder().to(dtype))
    pipe = IPAdapterPipeline(base, random_adapter(base.unet, method, encoder), encoder)
    call = dict(prompt="a photo", reference=_reference(), scale=0.8, width=64, height=64, **RUN)
    return pipe, call


def _faceid(dtype: torch.dtype):
    base = tiny_sd15_pipeline().to(dtype)
    pipe = IPAdapterPipeline(base, random_adapter(base.unet, "faceid"))
    call = dict(prompt="a photo", face_embedding=_embedding(), scale=0.8, width=64, height=64, **RUN)
    return pipe, call


def _instantid(dtype: torch.dtype, extra_controlnet: bool):
    base = tiny_sdxl_pipeline().to(dtype)
    nets = [tiny_controlnet(base.unet).to(dtype)]
    call = dict(
        prompt="a portrait", face_embedding=_embedding(), keypoints=KPS, scale=0.8, width=64, height=64
    )
    if extra_controlnet:
        nets.append(tiny_controlnet(base.unet, seed=1).to(dtype))
        call["control_image"] = _reference().resize((64, 64))
        call["controlnet_scale"] = [0.8, 0.5]
    pipe = IPAdapterPipeline(base, random_adapter(base.unet, "instantid"), controlnet=nets)
    return pipe, call | RUN


def _instantcharacter(dtype: torch.dtype):
    from idcraft.instantcharacter.pipeline import InstantCharacterPipeline
    from idcraft.instantcharacter.tiny import (
        random_instantcharacter,
        tiny_flux_pipeline,
        tiny_subject_encoder,
    )

    flux = tiny_flux_pipeline().to(dtype)
    adapter = random_instantcharacter(flux.transformer)
    pipe = InstantCharacterPipeline(flux, adapter, tiny_subject_encoder(), device="cpu")
    call = dict(prompt="a cat", reference=_reference(), scale=0.8, width=64, height=64, **RUN)
    return pipe, call


CASES = {
    "ip-adapter": lambda dtype: _ip_adapter("ip-adapter", dtype),
    "ip-adapter-plus": lambda dtype: _ip_adapter("ip-adapter-plus", dtype),
    "faceid-lora": _faceid,
    "instantid": lambda dtype: _instantid(dtype, extra_controlnet=False),
    "instantid+controlnet": lambda dtype: _instantid(dtype, extra_controlnet=True),
    "instantcharacter": _instantcharacter,
}


def _modules(pipe) -> dict[str, torch.nn.Module]:
    """Every module that computes during a call: the base pipeline's, the adapter's, the encoders'."""
    found = {
        name: module for name, module in pipe.pipe.components.items() if isinstance(module, torch.nn.Module)
    }
    found["adapter"] = pipe.adapter
    encoder = getattr(pipe, "encoder", None)
    if isinstance(encoder, ClipImageEncoder):
        found["image_encoder"] = encoder.model
    elif encoder is not None:
        found.update({f"encoder.{i}": m for i, m in enumerate(encoder.models)})
    return found


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    tensors = [*module.parameters(), *module.buffers()]
    return {t.dtype for t in tensors if t.is_floating_point()}


def _generate(case: str, dtype: torch.dtype):
    pipe, call = CASES[case](dtype)
    try:
        image = pipe(**call)[0]
    except RuntimeError as exc:
        if "not implemented for" in str(exc):
            pytest.skip(f"{case}: this CPU build of torch has no {dtype} kernel for an operation ({exc})")
        raise
    return pipe, np.asarray(image, dtype=np.float64)


_FLOAT32: dict[str, np.ndarray] = {}


def _float32_image(case: str) -> np.ndarray:
    if case not in _FLOAT32:
        _FLOAT32[case] = _generate(case, torch.float32)[1]
    return _FLOAT32[case]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision_generation(case, dtype):
    pipe, image = _generate(case, dtype)
    upcast = {name: _dtypes(m) for name, m in _modules(pipe).items() if _dtypes(m) - {dtype}}
    assert not upcast, f"{case}: modules not in {dtype} after the call: {upcast}"
    assert np.isfinite(image).all()
    assert image.std() > 1, f"{case}: a flat image (NaN decoded as black?)"
    difference = np.abs(image - _float32_image(case)).mean()
    assert difference < TOLERANCE[dtype], (
        f"{case}: {dtype} image is {difference:.3f} px from float32 on average"
    )


def test_controlnet_pipeline_keeps_half_precision():
    """diffusers' ``from_pipe`` moves every component to float32 unless given the dtype: the UNet, VAE and
    ControlNet were upcast while the adapter stayed float16 (``expected mat1 and mat2 to have the same
    dtype`` at ``to_k_ip``)."""
    from idcraft.adapter import IPAdapter

    base = tiny_sdxl_pipeline().to(torch.float16)
    net = tiny_controlnet(base.unet).to(torch.float16)
    pipe = IPAdapterPipeline(
        base, IPAdapter.for_unet(base.unet, "instantid", image_embed_dim=512), None, controlnet=net
    )
    assert pipe.pipe.unet.dtype == pipe.pipe.vae.dtype == pipe.pipe.controlnet.dtype == torch.float16
    image = pipe(
        "a portrait",
        face_embedding=_embedding(),
        keypoints=KPS,
        width=64,
        height=64,
        steps=1,
        seed=0,
        progress=False,
    )[0]
    assert pipe.pipe.unet.dtype == pipe.pipe.controlnet.dtype == torch.float16 and image.size == (64, 64)
