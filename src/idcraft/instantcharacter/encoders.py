"""The reference, seen by SigLIP and DINOv2 at two scales, as the official InstantCharacter pipeline sees it.

From the official ``encode_image_emb`` / ``encode_siglip_image_emb`` / ``encode_dinov2_image_emb``:

1. the reference is stretched to a square (side = its longer side), then resized to 384 x 384 (low
   resolution) and to 768 x 768, which is cut into four 384 x 384 tiles in the order top-left, top-right,
   bottom-left, bottom-right (PIL's default bicubic filter for every resize);
2. SigLIP (so400m-patch14-384) reads each with its own processor (384, mean = std = 0.5); DINOv2 (giant)
   with its processor set to resize the short side to 384 and centre-crop 384 (ImageNet mean/std), so
   both give 27 x 27 = 729 patch tokens. DINOv2's class token is dropped everywhere;
3. deep features = SigLIP's ``last_hidden_state`` (after its final LayerNorm) and DINOv2's
   ``last_hidden_state[:, 1:]`` (after its final LayerNorm); shallow features = the hidden states after
   SigLIP layers 7, 13, 26 and DINOv2 layers 9, 19, 29 (``hidden_states[i]``, 0 = embeddings), each
   encoder's three concatenated along the tokens;
4. SigLIP and DINOv2 tokens are put side by side in width (1152 + 1536 = 2688): ``low_res_deep``
   ``[1, 729, 2688]``, ``low_res_shallow`` ``[1, 3 x 729, 2688]``, and the four tiles' deep tokens one tile
   after the other, ``high_res_deep`` ``[1, 4 x 729, 2688]``. The low-resolution image is encoded alone,
   the four tiles as one batch, as in the official code.

Background removal is not done here: the official pipeline does not do it either. A cut-out reference
with transparency (RGBA PNG) is composited on white by :func:`idcraft.images.load_image`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import IdcraftError, ModelLoadError
from ..images import ImageInput, load_image

log = logging.getLogger(__name__)

#: Hidden-state indices of the shallow features (after that many encoder layers), official values.
SIGLIP_LAYERS = (7, 13, 26)
DINOV2_LAYERS = (9, 19, 29)
#: Side of the low-resolution view and of each tile; side of the image the tiles are cut from.
LOW_RES = 384
HIGH_RES = 768
#: Tile boxes in the official order: top-left, top-right, bottom-left, bottom-right.
TILES = tuple((x, y, x + LOW_RES, y + LOW_RES) for y in (0, LOW_RES) for x in (0, LOW_RES))


@dataclass
class SubjectFeatures:
    """The three feature sets the projector reads (``P`` patch tokens per 384 view, ``W`` = both widths)."""

    low_res_shallow: torch.Tensor  # [1, 3 x P, W]
    low_res_deep: torch.Tensor  # [1, P, W]
    high_res_deep: torch.Tensor  # [1, 4 x P, W]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SubjectFeatures:
        return SubjectFeatures(
            *(
                t.to(device=device, dtype=dtype)
                for t in (self.low_res_shallow, self.low_res_deep, self.high_res_deep)
            )
        )


def subject_views(image: Image.Image) -> tuple[Image.Image, list[Image.Image]]:
    """The 384 x 384 view and the four 384 x 384 tiles of the 768 x 768 view (official order)."""
    side = max(image.size)
    square = image.resize((side, side), Image.Resampling.BICUBIC)
    low = square.resize((LOW_RES, LOW_RES), Image.Resampling.BICUBIC)
    high = square.resize((HIGH_RES, HIGH_RES), Image.Resampling.BICUBIC)
    return low, [high.crop(box) for box in TILES]


def load_siglip_processor(path: str | os.PathLike | None = None):
    """SigLIP's processor from the encoder folder (PIL backend: the numbers the official code got from
    transformers' default slow processor); the so400m-patch14-384 settings when the folder has none."""
    from transformers import SiglipImageProcessorPil

    if path is not None and os.path.isfile(os.path.join(str(path), "preprocessor_config.json")):
        return SiglipImageProcessorPil.from_pretrained(str(path))
    return SiglipImageProcessorPil(size={"height": LOW_RES, "width": LOW_RES})


def load_dinov2_processor(path: str | os.PathLike | None = None):
    """DINOv2's processor (``BitImageProcessor``, PIL backend) from the encoder folder, ImageNet mean/std;
    resize and crop sizes are set per call to 384 as the official code sets them."""
    from transformers import BitImageProcessorPil

    if path is not None and os.path.isfile(os.path.join(str(path), "preprocessor_config.json")):
        return BitImageProcessorPil.from_pretrained(str(path))
    return BitImageProcessorPil(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


class SubjectEncoder:
    """SigLIP + DINOv2 with the official views, processors and layer choices (see the module docstring)."""

    def __init__(
        self,
        siglip,
        dinov2,
        siglip_processor=None,
        dinov2_processor=None,
        *,
        siglip_layers: Sequence[int] = SIGLIP_LAYERS,
        dinov2_layers: Sequence[int] = DINOV2_LAYERS,
    ):
        self.siglip = siglip.eval().requires_grad_(False)
        self.dinov2 = dinov2.eval().requires_grad_(False)
        self.siglip_processor = siglip_processor or load_siglip_processor()
        self.dinov2_processor = dinov2_processor or load_dinov2_processor()
        self.siglip_layers = tuple(siglip_layers)
        self.dinov2_layers = tuple(dinov2_layers)
        for name, model, layers in (
            ("SigLIP", siglip, self.siglip_layers),
            ("DINOv2", dinov2, self.dinov2_layers),
        ):
            depth = model.config.num_hidden_layers
            if max(layers) > depth:
                raise IdcraftError(
                    f"the {name} encoder has {depth} layers, but InstantCharacter reads the hidden states after "
                    f"layers {', '.join(map(str, layers))}: use the encoder the adapter was trained with "
                    "(google/siglip-so400m-patch14-384 and facebook/dinov2-giant)."
                )

    @classmethod
    def from_pretrained(
        cls,
        siglip_path: str | os.PathLike,
        dinov2_path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SubjectEncoder:
        """Load both encoders (a full SigLIP checkpoint works: its vision tower is taken) and processors."""
        from transformers import AutoConfig, Dinov2Model, SiglipVisionModel

        from ..models import _unreachable

        models = []
        for path, flag, name, model_class, kinds, official in (
            (
                siglip_path,
                "--image-encoder",
                "SigLIP",
                SiglipVisionModel,
                ("siglip", "siglip_vision_model"),
                "google/siglip-so400m-patch14-384",
            ),
            (dinov2_path, "--image-encoder-2", "DINOv2", Dinov2Model, ("dinov2",), "facebook/dinov2-giant"),
        ):
            what = f"{name} image encoder ({flag})"
            try:
                kind = AutoConfig.from_pretrained(str(path)).model_type
            except Exception as exc:
                raise _unreachable(what, str(path), exc) from exc
            if kind not in kinds:  # transformers would load it anyway, with random weights
                raise ModelLoadError(
                    f"{flag} {path} is a {kind!r} model; InstantCharacter reads {name} there ({official})."
                )
            try:
                models.append(model_class.from_pretrained(str(path), dtype=dtype))
            except Exception as exc:
                raise _unreachable(what, str(path), exc) from exc
        siglip, dinov2 = models
        return cls(  # dtype again: older transformers read ``torch_dtype`` instead
            siglip.to(device=device, dtype=dtype),
            dinov2.to(device=device, dtype=dtype),
            load_siglip_processor(siglip_path),
            load_dinov2_processor(dinov2_path),
        )

    @property
    def width(self) -> int:
        """Width of the features the projector reads: SigLIP's hidden size + DINOv2's."""
        return self.siglip.config.hidden_size + self.dinov2.config.hidden_size

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.siglip, self.dinov2]

    def _siglip(self, images: list[Image.Image], shallow: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = self.siglip_processor(images=images, return_tensors="pt").pixel_values
        out = self.siglip(_on(self.siglip, pixels), output_hidden_states=shallow)
        layers = torch.cat([out.hidden_states[i] for i in self.siglip_layers], dim=1) if shallow else None
        return out.last_hidden_state, layers

    def _dinov2(self, images: list[Image.Image], shallow: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = self.dinov2_processor(
            images=images,
            size={"shortest_edge": LOW_RES},
            crop_size={"height": LOW_RES, "width": LOW_RES},
            return_tensors="pt",
        ).pixel_values
        out = self.dinov2(_on(self.dinov2, pixels), output_hidden_states=shallow)
        layers = (
            torch.cat([out.hidden_states[i][:, 1:] for i in self.dinov2_layers], dim=1) if shallow else None
        )
        return out.last_hidden_state[:, 1:], layers

    @torch.no_grad()
    def encode(self, image: ImageInput) -> SubjectFeatures:
        """One reference -> :class:`SubjectFeatures` (batch 1)."""
        low, tiles = subject_views(load_image(image))
        siglip_deep, siglip_shallow = self._siglip([low], shallow=True)
        dinov2_deep, dinov2_shallow = self._dinov2([low], shallow=True)
        if siglip_deep.shape[1] != dinov2_deep.shape[1]:
            raise IdcraftError(
                f"SigLIP gives {siglip_deep.shape[1]} patch tokens for a {LOW_RES}x{LOW_RES} view but DINOv2 gives "
                f"{dinov2_deep.shape[1]}; InstantCharacter puts them side by side, so both must see the same grid "
                "(SigLIP so400m-patch14-384 and DINOv2 with patch 14: 27 x 27)."
            )
        tiles_siglip, _ = self._siglip(tiles, shallow=False)
        tiles_dinov2, _ = self._dinov2(tiles, shallow=False)
        # [(tiles), P, C] -> [1, tiles x P, C]: tile after tile, in the official order.
        high_res_deep = torch.cat(
            [
                tiles_siglip.reshape(1, -1, tiles_siglip.shape[-1]),
                tiles_dinov2.reshape(1, -1, tiles_dinov2.shape[-1]),
            ],
            dim=2,
        )
        return SubjectFeatures(
            low_res_shallow=torch.cat([siglip_shallow, dinov2_shallow], dim=2),
            low_res_deep=torch.cat([siglip_deep, dinov2_deep], dim=2),
            high_res_deep=high_res_deep,
        )


def _on(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` on the model's device and in its dtype (the official code casts them so too)."""
    param = next(model.parameters())
    return pixels.to(device=param.device, dtype=param.dtype)
